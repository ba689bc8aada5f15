"""The trainer's data API: `prepare` (tokenizer + token caches), `train_batches`, `eval_batches`; and
`python -m tinyjax.data --config=configs/NAME.py`, which builds (or resumes) the config's caches and prints a summary.

Sources (corpus.py): cfg.data.train_urls and each cfg.data.validation_urls[name] list files (.jsonl/.json/.parquet/
.txt, optionally .gz; local, gs://, hf://; globs) or name one prebuilt Levanter cache directory, used as-is.
Cache layout under root = expanduser(cfg.data.cache_dir):
  tokenizers/...                           the builtin tokenizer / downloaded hub tokenizers (tokenizer.py)
  <key>/train                              cache of cfg.data.train_urls
  <key>/<eval name>                        cache of cfg.data.validation_urls[<eval name>] (e.g. <key>/paloma/c4_en)
  remote/...                               local mirrors of prebuilt remote caches (cache.fetch)
where <key> = sha256(json{sources: [corpus.source_id(url)...], tokenizer_sha256: of the tokenizer.json,
vocab_size: the tokenizer's size, text_key})[:12], computed per split: changing the sources or the tokenizer makes a new
directory, adding an eval set never rebuilds the others, and the same tokenizer.json reached as "builtin" or by path
shares caches. Each cache is a Levanter TreeCache (cache.py); its ledger also records the tokenizer and what was
skipped. A prebuilt cache is checked against cfg.data.tokenizer (name and size, as Levanter records them).

Training stream (Levanter/Marin): window i is tokens [i*S, (i+1)*S) of the split's flat stream (documents packed as
Levanter's BatchTokenizer encodes them, no padding; the model masks attention across EOS); Grain permutes the windows
with data_seed, a fresh permutation each epoch, forever; global batch k is permuted positions [k*B, (k+1)*B), and
process p gets rows [p*B/P, (p+1)*B/P). So the order is a pure function of (data_seed, step) and resuming needs only
the step (Levanter iter_from_step; no loader state).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import time
from typing import Iterator

import grain
import numpy as np
from absl import flags

from tinyjax.errors import ConfigError
from tinyjax.data import builder, cache, corpus, tokenizer as tokenizers
from tinyjax.runtime import faults

TRAIN_SPLIT = "train"


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: a dataclass __eq__ over an ndarray field is ambiguous
class Dataset:
  tokenizer_path: str  # the tokenizer.json used
  tokenizer_vocab_size: int
  bos_id: int | None
  eos_id: int
  byte_lengths: np.ndarray  # int32[cfg.model.vocab_size] (Marin rule; rows past the tokenizer are 0)
  train_cache: str  # cache dir of the train split
  eval_caches: dict[str, str]  # eval-set name -> cache dir (from cfg.data.validation_urls)


def _cache_dir(root: str, urls, tok: tokenizers.Loaded, name: str, text_key: str) -> str:
  if not name or name.startswith("/") or ".." in name.split("/"):
    raise ConfigError(f"config.data.validation_urls: eval-set name {name!r} must be a plain relative name")
  ident = {"sources": [corpus.source_id(u) for u in urls], "tokenizer_sha256": tok.sha256,
           "vocab_size": tok.vocab_size, "text_key": text_key}
  key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]
  return os.path.join(root, key, name)


def _prebuilt(root: str, url: str, tok: tokenizers.Loaded, key: str) -> str:
  path = cache.fetch(url, root)
  if not cache.exists(os.path.join(path, cache.LEDGER)):
    raise ConfigError(f"config.{key}: {url!r} is neither a supported file ({', '.join(corpus.FORMATS)}, optionally "
                      f"{', '.join(corpus.COMPRESSIONS)}) nor a Levanter cache directory (no {cache.LEDGER})")
  cache.TokenCache(path, tok.sha256, tok.name, tok.vocab_size)  # refuses unfinished caches and other tokenizers
  return path


def _prepare_split(root: str, urls: list[str], tok: tokenizers.Loaded, name: str, cfg, key: str) -> str:
  """The finished cache dir of one split: a prebuilt cache as-is, or ours, built/resumed when missing."""
  kinds = [corpus.kind(u) for u in urls]
  if "cache" in kinds:
    if len(urls) != 1:
      raise ConfigError(f"config.{key}: {urls[kinds.index('cache')]!r} is a prebuilt cache (not a .jsonl/.json/"
                        ".parquet/.txt file), so it must be the only source of its split")
    return _prebuilt(root, urls[0], tok, key)
  path = _cache_dir(root, urls, tok, name, cfg.data.text_key)
  faults.stop_point()
  if not os.path.exists(os.path.join(path, cache.LEDGER)):
    files = [f for u in urls for f in corpus.expand(u, key)]
    start = time.time()
    d = cfg.data
    builder.build(path, files, tok, name=name, text_key=d.text_key, max_bad_fraction=d.max_bad_fraction,
                num_proc=d.num_proc)
    print(f"data: built {name} cache in {time.time() - start:.1f}s: {cache.summary(path)} -> {path}", flush=True)
  cache.TokenCache(path, tok.sha256, tok.name)  # refuses unfinished caches and other tokenizers
  return path


def prepare(cfg) -> Dataset:
  """Loads the tokenizer and builds (or resumes, or fetches) the missing caches; cheap once they exist."""
  root = os.path.expanduser(cfg.data.cache_dir)
  train_urls = list(cfg.data.train_urls)
  tok = tokenizers.load(cfg.data.tokenizer, root, train_urls, cfg.model.vocab_size)
  if tok.vocab_size > cfg.model.vocab_size:
    raise ConfigError(f"config.model.vocab_size={cfg.model.vocab_size} is invalid: the tokenizer "
                      f"{cfg.data.tokenizer!r} has {tok.vocab_size} ids; set it >= that")
  train = _prepare_split(root, train_urls, tok, TRAIN_SPLIT, cfg, "data.train_urls")
  evals = {name: _prepare_split(root, list(urls), tok, name, cfg, f"data.validation_urls['{name}']")
           for name, urls in sorted(cfg.data.validation_urls.items())}
  return Dataset(tok.path, tok.vocab_size, tok.bos_id, tok.eos_id,
                 tokenizers.byte_lengths(tok.tokenizer, cfg.model.vocab_size, tok.special_ids, tok.clean_up_spaces),
                 train, evals)


def _rows(batch_size: int, process_index: int, process_count: int, key: str) -> tuple[int, int]:
  if batch_size % process_count or not 0 <= process_index < process_count:
    raise ConfigError(f"config.{key}={batch_size} is invalid: must divide evenly over {process_count} processes")
  per = batch_size // process_count
  return process_index * per, (process_index + 1) * per


@dataclasses.dataclass(frozen=True)
class _ReadWindows:
  """Global batch of window indices -> this process's int32[rows, S] (one batched tensorstore read)."""
  tokens: cache.TokenCache
  seq_len: int
  lo: int
  hi: int

  def __call__(self, window_ids):
    idx = np.asarray(window_ids)[self.lo:self.hi]
    return np.stack(self.tokens.read_many([(int(i) * self.seq_len, (int(i) + 1) * self.seq_len) for i in idx]))


def _worker_watches(parent: int, worker_index: int, worker_count: int) -> None:
  """A Grain worker exits with the process that reads the batches (a kill -9 of it included)."""
  faults.watch_parent(parent)


def _parse_absl_flags() -> None:
  """Grain workers read absl flags (grain_enable_multiprocess_worker_profiling); tests/notebooks never parse them."""
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def train_batches(ds: Dataset, cfg, start_step: int = 0, process_index: int = 0,
                  process_count: int = 1) -> Iterator[np.ndarray]:
  """Host-local int32[B/P, S] rows of global batches start_step, start_step+1, ... (infinite)."""
  seq, batch = cfg.model.seq_len, cfg.train.train_batch_size
  tokens = cache.TokenCache(ds.train_cache)
  num_windows = tokens.num_tokens // seq
  if num_windows == 0:
    raise ConfigError(f"config.model.seq_len={seq} is invalid: the training stream has only {tokens.num_tokens} "
                      "tokens, less than one window")
  lo, hi = _rows(batch, process_index, process_count, "train.train_batch_size")
  order = grain.MapDataset.range(num_windows).shuffle(seed=cfg.train.data_seed).repeat(None).batch(batch)
  # A few threads overlap tensorstore reads with the step; 8 batches ahead bounds host memory (8 x B x S x 4 bytes).
  loader = order[start_step:].map(_ReadWindows(tokens, seq, lo, hi)).to_iter_dataset(
      grain.ReadOptions(num_threads=4, prefetch_buffer_size=8))
  if cfg.data.num_workers > 0:  # workers change throughput only: Grain keeps the order
    _parse_absl_flags()
    loader = loader.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.data.num_workers),
                                worker_init_fn=functools.partial(_worker_watches, os.getpid()))
  return iter(loader)


def num_eval_windows(ds: Dataset, cfg, name: str) -> int:
  """Non-overlapping seq_len windows of the eval stream; the trailing partial window is dropped (Levanter)."""
  return cache.TokenCache(ds.eval_caches[name]).num_tokens // cfg.model.seq_len


def eval_batches(ds: Dataset, cfg, name: str, process_index: int = 0,
                 process_count: int = 1) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """(int32[Be/P, S] windows in order, bool[Be/P] real-row mask); the last batch is padded with rows of EOS."""
  seq, t = cfg.model.seq_len, cfg.train
  size = t.eval_batch_size or t.train_batch_size
  lo, hi = _rows(size, process_index, process_count, "train.eval_batch_size")
  tokens = cache.TokenCache(ds.eval_caches[name])
  windows = tokens.num_tokens // seq
  num_batches = -(-windows // size)
  if t.max_eval_batches > 0:
    num_batches = min(num_batches, t.max_eval_batches)
  for b in range(num_batches):
    first, last = min(b * size + lo, windows), min(b * size + hi, windows)  # real windows of this process
    rows = np.full((hi - lo, seq), ds.eos_id, np.int32)
    rows[:last - first] = tokens.read(first * seq, last * seq).reshape(-1, seq)
    yield rows, np.arange(hi - lo) < last - first
