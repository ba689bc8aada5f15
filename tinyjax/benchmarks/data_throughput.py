"""Data-path throughput on this machine: tokenization (MB/s, tokens/s) and the training loader (tokens/s, and the
share of step time it adds). Not a test; run by hand and record the figures in BUILD_NOTES.md:

  python -m tinyjax.benchmarks.data_throughput [--tokens=67108864] [--batch=128] [--seq_len=1024] [--step_ms=155]

Tokenization: the built-in corpus (real English prose, ~1.7 MB) written as C4-style .json.gz shards, encoded with
the built-in byte-level BPE (vocab --vocab) by (a) encode_batch alone, (b) a full cache build in one process and
(c) with --num_proc processes. Loader: a --tokens random-token cache on local disk, data.train_batches at
batch x seq_len; then the same loop with a simulated --step_ms device step (Marin's llama_50m step on an H200 is
~155 ms: 1,179 s / 7,629 steps), reporting how long next() blocks per step.
"""
from __future__ import annotations

import gzip
import json
import os
import shutil
import tempfile
import time

import numpy as np
from absl import app, flags

from tinyjax import config, data
from tinyjax.data import cache, corpus, tokenizer as tokenizers

_TOKENS = flags.DEFINE_integer("tokens", 64 * 2**20, "Tokens in the loader benchmark's cache.")
_BATCH = flags.DEFINE_integer("batch", 128, "Global batch (sequences).")
_SEQ = flags.DEFINE_integer("seq_len", 1024, "Sequence length.")
_STEPS = flags.DEFINE_integer("steps", 100, "Loader batches timed.")
_STEP_MS = flags.DEFINE_float("step_ms", 155.0, "Simulated device step time for the overhead measurement.")
_VOCAB = flags.DEFINE_integer("vocab", 32768, "Built-in BPE vocabulary for the tokenization benchmark.")
_NUM_PROC = flags.DEFINE_integer("num_proc", 2, "Build processes for the parallel tokenization figure.")
_SHARDS = flags.DEFINE_integer("shards", 4, "C4-style .json.gz files the corpus is split into.")


def tokenization(root: str) -> None:
  docs = list(corpus.documents("builtin:python-docs/train"))
  mb = sum(len(d.encode()) for d in docs) / 1e6
  files = []
  for i in range(_SHARDS.value):
    path = os.path.join(root, f"c4-train.{i:05d}-of-{_SHARDS.value:05d}.json.gz")
    with gzip.open(path, "wt", encoding="utf-8") as f:
      for j, d in enumerate(docs[i::_SHARDS.value]):
        f.write(json.dumps({"text": d, "timestamp": "2019-04-25T12:57:54Z", "url": f"https://x/{j}"}) + "\n")
    files.append(path)
  tok = tokenizers.load("builtin", root, ["builtin:python-docs/train"], _VOCAB.value)
  start = time.perf_counter()
  n = sum(len(ids) for k in range(0, len(docs), 1024) for ids in tok.encode_batch(docs[k:k + 1024]))
  dt = time.perf_counter() - start
  print(f"encode_batch only:        {mb / dt:6.2f} MB/s, {n / dt / 1e6:5.2f} M tokens/s "
        f"({mb:.2f} MB, {n:,} tokens, vocab {_VOCAB.value})")
  for num_proc in (1, _NUM_PROC.value):
    out = os.path.join(root, f"build{num_proc}")
    start = time.perf_counter()
    cache.build(out, files, tok, name=f"bench{num_proc}", text_key="text", max_bad_fraction=0.0,
                num_proc=num_proc, log=lambda m: None)
    dt = time.perf_counter() - start
    print(f"cache build, num_proc={num_proc}:  {mb / dt:6.2f} MB/s, {n / dt / 1e6:5.2f} M tokens/s "
          f"(read .json.gz + encode + write + consolidate, {dt:.2f} s incl. worker start-up)")


def loader(root: str) -> None:
  rng = np.random.default_rng(0)
  lengths = rng.integers(200, 2000, size=_TOKENS.value // 1100)
  docs = (rng.integers(0, 128_256, size=n, dtype=np.int32) for n in lengths)
  path = os.path.join(root, "loader")
  start = time.perf_counter()
  cache.write(path, docs, {})
  print(f"random cache: {int(lengths.sum()):,} tokens written in {time.perf_counter() - start:.1f} s")
  cfg = config.base()
  cfg.model.seq_len, cfg.train.train_batch_size = _SEQ.value, _BATCH.value
  ds = data.Dataset("", 128_256, 0, 1, np.zeros(1, np.int32), path, {})
  tokens_per_batch = _BATCH.value * _SEQ.value
  it = data.train_batches(ds, cfg)
  for _ in range(5):
    next(it)
  start = time.perf_counter()
  for _ in range(_STEPS.value):
    next(it)
  dt = time.perf_counter() - start
  print(f"loader, back to back:     {_STEPS.value * tokens_per_batch / dt / 1e6:5.2f} M tokens/s "
        f"({_STEPS.value / dt:.1f} batches/s of {_BATCH.value} x {_SEQ.value})")
  it = data.train_batches(ds, cfg, start_step=10_000)
  next(it)
  waits = []
  for _ in range(min(_STEPS.value, 40)):
    time.sleep(_STEP_MS.value / 1e3)  # the device step runs; Grain's threads prefetch meanwhile
    start = time.perf_counter()
    next(it)
    waits.append(time.perf_counter() - start)
  w = np.array(waits) * 1e3
  print(f"loader, {_STEP_MS.value:.0f} ms steps:     next() blocks {w.mean():.3f} ms mean, "
        f"{np.percentile(w, 99):.3f} ms p99 = {100 * w.mean() / _STEP_MS.value:.3f}% of step time")


def main(argv) -> None:
  del argv
  root = tempfile.mkdtemp(prefix="tinyjax-bench-")
  try:
    tokenization(root)
    loader(root)
  finally:
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
  app.run(main)
