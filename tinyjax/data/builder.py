"""The parallel, resumable, atomic builder of token caches (cache.py holds the layout, writer and reader).

Building (`build`): <dir>.building/ holds one store per source file (shards/NNNNN, written by a pool of spawned
processes, each renamed into place when whole) and a ledger with is_finished=false listing the finished ones, so a
killed build resumes where it stopped. When every file is done the shards are concatenated into <dir>.building/
input_ids, the ledger is marked finished, and the directory is renamed to <dir>: a cache without is_finished=true is
never read, and <dir> exists only when complete. A lock file serialises builders of the same cache.
"""
from __future__ import annotations

import contextlib
import fcntl
import multiprocessing
import os
import queue as queues
import shutil
import time
from typing import Iterator

import numpy as np

from tinyjax.errors import ConfigError
from tinyjax.data import cache, corpus, tokenizer as tokenizers
from tinyjax.runtime import faults

ENCODE_BATCH_DOCS = 1024  # documents per encode_batch call (the Rust side parallelises within a call)
PROGRESS_SECONDS = 10.0  # between progress lines of a build
BUILDING = ".building"


_WORKER: dict = {}


def _init_worker(tok, progress_queue, threads: int, parent: int) -> None:
  faults.watch_parent(parent)  # usually watching already since its tinyjax import (faults.watch_parent_if_spawned)
  if threads:
    os.environ.setdefault("RAYON_NUM_THREADS", str(threads))  # tokenizers' pool: cores / workers, not cores each
  _WORKER.update(tok=tok, report=progress_queue.put)


def _encode_shard(task: tuple) -> dict:
  """One source file -> a finished store at out_dir; returns its counts. Runs in a worker or in-process."""
  index, url, out_dir, text_key, max_bad_fraction = task
  tok, report = _WORKER["tok"], _WORKER["report"]
  skips, fraction, nbytes = corpus.Skips(), [0.0], [0]

  def encode(texts):
    ids = tok.encode_batch(texts)
    lengths = np.fromiter(map(len, ids), np.int64, len(ids))
    size = sum(len(t.encode("utf-8")) for t in texts)
    nbytes[0] += size
    report((index, fraction[0], len(texts), int(lengths.sum()), size))
    return np.concatenate(ids), lengths

  def blocks():
    batch = []
    for text in corpus.read(url, text_key, skips, progress=lambda f: fraction.__setitem__(0, f)):
      batch.append(text)
      if len(batch) == ENCODE_BATCH_DOCS:
        yield encode(batch)
        batch = []
    if batch:
      yield encode(batch)

  tmp = out_dir + ".tmp"
  shutil.rmtree(tmp, ignore_errors=True)
  rows, tokens = cache.write_store(tmp, blocks())
  corpus.check_bad_fraction(skips, url, max_bad_fraction)
  os.rename(tmp, out_dir)
  report((index, 1.0, 0, 0, 0))
  return {"url": url, "docs": rows, "tokens": tokens, "bytes": nbytes[0], "skipped": skips.as_dict()}


def _size(url: str) -> int:
  try:
    return os.path.getsize(url) if "://" not in url else int(corpus._fs(url).size(url) or 1)  # noqa: SLF001
  except (OSError, ValueError, ConfigError):
    return 1  # unknown (e.g. builtin): counts as one unit of progress


def _duration(seconds: float) -> str:
  seconds = int(seconds)
  return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class Progress:
  """Aggregates worker reports into docs/s, tokens/s, MB/s and an ETA weighted by file size."""

  def __init__(self, name: str, sizes: dict[int, int], done_before: int, total_shards: int, log=cache.log):
    self.name, self.sizes, self.log = name, sizes, log
    self.done_before, self.total_shards = done_before, total_shards
    self.fraction = {i: 0.0 for i in sizes}
    self.counts = {i: np.zeros(3, np.int64) for i in sizes}  # docs, tokens, text bytes per file
    self.start = self.last = time.time()

  def update(self, item) -> None:
    index, fraction, docs, tokens, nbytes = item
    self.fraction[index] = max(self.fraction[index], fraction)
    self.counts[index] += (docs, tokens, nbytes)

  def finish(self, index: int, stats: dict) -> None:  # exact counts (reports may still be in the queue)
    self.fraction[index] = 1.0
    self.counts[index] = np.array([stats["docs"], stats["tokens"], stats["bytes"]], np.int64)

  def line(self) -> str:
    dt = max(time.time() - self.start, 1e-9)
    self.docs, self.tokens, self.bytes = (int(v) for v in sum(self.counts.values(), np.zeros(3, np.int64)))
    total = sum(self.sizes.values()) or 1
    f = sum(self.sizes[i] * self.fraction[i] for i in self.sizes) / total
    eta = _duration(dt * (1 - f) / f) if f > 0 else "?"
    done = self.done_before + sum(1 for v in self.fraction.values() if v >= 1.0)
    return (f"data: {self.name}: {done}/{self.total_shards} files, {self.docs:,} docs ({self.docs / dt:,.0f} docs/s), "
            f"{self.tokens:,} tokens ({self.tokens / dt:,.0f} tokens/s, {self.bytes / dt / 1e6:.2f} MB/s), "
            f"{100 * f:.1f}% ETA {eta}")

  def maybe_print(self) -> None:
    if time.time() - self.last >= PROGRESS_SECONDS:
      self.last = time.time()
      self.log(self.line())


@contextlib.contextmanager
def _locked(path: str):
  """An exclusive lock on path (fcntl): concurrent builders of one cache take turns."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _run_in_process(tasks, tok, progress: Progress, record) -> None:
  _WORKER.update(tok=tok, report=lambda item: (progress.update(item), progress.maybe_print(), faults.stop_point()))
  for task in tasks:
    record(task[0], _encode_shard(task))


def _run_pool(tasks, tok, progress: Progress, record, workers: int) -> None:
  ctx = multiprocessing.get_context("spawn")  # fork is unsafe under JAX's and tokenizers' threads
  q = ctx.Queue()
  threads = max(1, (os.cpu_count() or 1) // workers)
  pool = ctx.Pool(workers, initializer=_init_worker, initargs=(tok, q, threads, os.getpid()))
  try:
    pending = {task[0]: pool.apply_async(_encode_shard, (task,)) for task in tasks}
    while pending:
      try:
        progress.update(q.get(timeout=0.2))
      except queues.Empty:
        pass
      for index, result in list(pending.items()):
        if result.ready():
          record(index, result.get())  # re-raises a worker's DataError here
          del pending[index]
      progress.maybe_print()
      faults.stop_point()  # a stop signal: the pool is terminated below, then the exit is main's one line
  finally:
    pool.terminate()  # on an error or Ctrl-C, no worker outlives the build
    pool.join()


def _shard_blocks(dirs: list[str]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """The documents of finished shard stores, in order, as (flat, lengths) blocks of ~cache.FLUSH_TOKENS."""
  for d in dirs:
    faults.stop_point()
    off = cache.open_store(os.path.join(d, cache.FIELD, "offsets"))
    n = int(off[0].read().result())
    ends = off[1:n + 1].read().result().astype(np.int64) if n else np.zeros(0, np.int64)
    data = cache.open_store(os.path.join(d, cache.FIELD, "data"))
    row, tok = 0, 0
    while row < n:
      stop = max(row + 1, int(np.searchsorted(ends, tok + cache.FLUSH_TOKENS, side="right")))
      end = int(ends[stop - 1])
      yield data[tok:end].read().result(), np.diff(ends[row:stop], prepend=tok)
      row, tok = stop, end


def build(path: str, files: list[str], tok: tokenizers.Loaded, *, name: str, text_key: str,
          max_bad_fraction: float, num_proc: int, log=cache.log) -> dict:
  """Builds (or resumes, or just returns) the finished cache at path from source files; returns its ledger."""
  with _locked(path + ".lock"):
    if os.path.exists(os.path.join(path, cache.LEDGER)):
      return cache.read_json(os.path.join(path, cache.LEDGER))
    building = path + BUILDING
    ledger_path = os.path.join(building, cache.LEDGER)
    meta = cache.preprocessor_metadata(tok)
    state = cache.read_json(ledger_path) if os.path.exists(ledger_path) else None
    if state and (state["tinyjax_build"]["sources"] != files or state["metadata"]["preprocessor_metadata"] != meta):
      log(f"data: {name}: the sources or tokenizer changed since the interrupted build; starting over")
      state = None
    if state is None:
      shutil.rmtree(building, ignore_errors=True)
      os.makedirs(os.path.join(building, "shards"))
      state = cache.new_ledger(0, 0, {}, meta, finished=False, tinyjax_build={"sources": files, "files": {}})
      cache.write_json(ledger_path, state)
    elif state["finished_shards"]:
      log(f"data: {name}: resuming an interrupted build: {len(state['finished_shards'])}/{len(files)} files done")
    if not state["is_finished"]:
      _build_shards(building, files, tok, state, name, text_key, max_bad_fraction, num_proc, log)
    os.rename(building, path)
    return state


def _build_shards(building, files, tok, state, name, text_key, max_bad_fraction, num_proc, log) -> None:
  ledger_path, shard_dir = os.path.join(building, cache.LEDGER), os.path.join(building, "shards")
  names = [f"{i:05d}" for i in range(len(files))]
  finished = set(state["finished_shards"])
  for entry in os.listdir(shard_dir):  # half-written or unrecorded shards of a killed build
    if entry not in finished:
      shutil.rmtree(os.path.join(shard_dir, entry), ignore_errors=True)
  tasks = [(i, f, os.path.join(shard_dir, names[i]), text_key, max_bad_fraction)
           for i, f in enumerate(files) if names[i] not in finished]

  progress = Progress(name, {t[0]: _size(t[1]) for t in tasks}, len(files) - len(tasks), len(files), log)

  def record(index: int, stats: dict) -> None:  # a shard is finished once the ledger lists it
    progress.finish(index, stats)
    state["shard_rows"][names[index]] = stats["docs"]
    state["finished_shards"] = sorted(state["shard_rows"])
    state["tinyjax_build"]["files"][names[index]] = stats
    state["total_num_rows"] = sum(state["shard_rows"].values())
    state["field_counts"][cache.FIELD] = sum(s["tokens"] for s in state["tinyjax_build"]["files"].values())
    cache.write_json(ledger_path, state)

  workers = min(num_proc or os.cpu_count() or 1, len(tasks))
  if workers > 1:
    _run_pool(tasks, tok, progress, record, workers)
  else:
    _run_in_process(tasks, tok, progress, record)
  if tasks:
    log(progress.line())
  skips = corpus.Skips()
  for n in names:
    skips.merge(state["tinyjax_build"]["files"][n]["skipped"])
  if state["total_num_rows"] == 0:
    raise corpus.DataError(f"data: {name}: the sources {files[:3]}{'...' if len(files) > 3 else ''} hold no "
                           f"documents (skipped: {skips.summary()})")
  dirs = [os.path.join(shard_dir, n) for n in names]
  if len(dirs) == 1:  # one file: its store is already the cache
    shutil.rmtree(os.path.join(building, cache.FIELD), ignore_errors=True)
    os.rename(os.path.join(dirs[0], cache.FIELD), os.path.join(building, cache.FIELD))
  else:
    cache.write_store(building, _shard_blocks(dirs))
  state["tinyjax_build"]["skipped"] = skips.as_dict()
  state["tinyjax_build"]["bytes"] = sum(s["bytes"] for s in state["tinyjax_build"]["files"].values())
  state["is_finished"] = True
  cache.write_json(ledger_path, state)
  shutil.rmtree(shard_dir, ignore_errors=True)
