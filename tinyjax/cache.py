"""Token caches in Levanter's TreeCache layout, so caches built by Levanter/Marin read as-is (and ours in Levanter),
and the parallel, resumable builder that writes them.

One directory per split:
  shard_ledger.json   CacheLedger (levanter/store/cache.py): total_num_rows, shard_rows, is_finished, finished_shards,
                      field_counts, field_counts_by_shard, layout, metadata{preprocessor_metadata{tokenizer,
                      vocab_size, append_bos, append_eos, ...}}; we add tokenizer_sha256 to preprocessor_metadata and
                      a top-level "tinyjax_build" (per-source docs/tokens/bytes and skipped records).
  input_ids/offsets   zarr3 int64, declared shape [2^54]: offsets[0] = number of rows (documents),
                      offsets[1..n] = cumulative end of each row in data (levanter/store/jagged_array.py)
  input_ids/data      zarr3 int32, declared shape [2^54]: the documents' token ids back to back
Both arrays use Levanter's _get_spec: regular chunks of 2^27 elements, each a `sharding_indexed` shard of 2^18-element
inner chunks compressed with blosc clevel 5. Levanter's newer "sharded" layout (one such store per shard
subdirectory, listed in finished_shards) is read as the concatenation of its shards.

Building (`build`): <dir>.building/ holds one store per source file (shards/NNNNN, written by a pool of spawned
processes, each renamed into place when whole) and a ledger with is_finished=false listing the finished ones, so a
killed build resumes where it stopped. When every file is done the shards are concatenated into <dir>.building/
input_ids, the ledger is marked finished, and the directory is renamed to <dir>: a cache without is_finished=true is
never read, and <dir> exists only when complete. A lock file serialises builders of the same cache.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import multiprocessing
import os
import queue as queues
import shutil
import tempfile
import time
from typing import Iterable, Iterator

import numpy as np
import tensorstore as ts

from tinyjax import corpus
from tinyjax import tokenizer as tokenizers
from tinyjax.config import ConfigError

LEDGER = "shard_ledger.json"
FIELD = "input_ids"
INNER_CHUNK = 256 * 1024  # Levanter DEFAULT_CHUNK_SIZE: 1 MiB of int32
SHARD_CHUNK = INNER_CHUNK * 512  # Levanter DEFAULT_WRITE_CHUNK_SIZE
DECLARED_SIZE = 2**54  # Levanter creates every array this long; offsets[0]/offsets[n] say what is used
# Writes rewrite the shard they touch, so flush in big pieces (<= 8 rewrites of a 2^27-token shard).
FLUSH_TOKENS = SHARD_CHUNK // 8
READ_CACHE_BYTES = 256 << 20  # decoded-chunk cache per reader: random windows reuse 1 MiB inner chunks
ENCODE_BATCH_DOCS = 1024  # documents per encode_batch call (the Rust side parallelises within a call)
PROGRESS_SECONDS = 10.0  # between progress lines of a build
BUILDING = ".building"


def _print(message: str) -> None:
  print(message, flush=True)


def zarr3_spec(path: str) -> dict:
  """Levanter jagged_array._get_spec for a rank-1 field."""
  return {
      "driver": "zarr3",
      "kvstore": {"driver": "file", "path": os.path.abspath(path)},
      "metadata": {
          "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [SHARD_CHUNK]}},
          "codecs": [{"name": "sharding_indexed", "configuration": {
              "chunk_shape": [INNER_CHUNK], "codecs": [{"name": "blosc", "configuration": {"clevel": 5}}]}}],
      },
  }


def _create(path: str, dtype) -> ts.TensorStore:
  return ts.open(zarr3_spec(path), create=True, delete_existing=True, dtype=dtype, shape=[DECLARED_SIZE]).result()


def preprocessor_metadata(tok: tokenizers.Loaded) -> dict:
  """What Levanter's BatchTokenizer.metadata records, plus the hash that pins the exact tokenizer.json."""
  return {"tokenizer": tok.name, "vocab_size": tok.vocab_size, "return_attention_mask": False, "padding": False,
          "max_length": None, "append_bos": tok.append_bos, "append_eos": tok.append_eos,
          "tokenizer_sha256": tok.sha256}


def _write_json(path: str, obj) -> None:
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
  with os.fdopen(fd, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=1)
  os.replace(tmp, path)


def _read_json(path: str):
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _write_store(path: str, blocks: Iterable[tuple[np.ndarray, np.ndarray]]) -> tuple[int, int]:
  """Writes (flat int32 tokens, int64 doc lengths) blocks as one jagged array under path/input_ids."""
  offsets = _create(os.path.join(path, FIELD, "offsets"), ts.int64)
  data = _create(os.path.join(path, FIELD, "data"), ts.int32)
  rows, tokens, pending, buffered = 0, 0, [], 0

  def flush():
    nonlocal rows, tokens
    flat = np.concatenate([p[0] for p in pending]).astype(np.int32, copy=False)
    ends = tokens + np.cumsum(np.concatenate([p[1] for p in pending]), dtype=np.int64)
    data[tokens:tokens + len(flat)].write(flat).result()
    offsets[rows + 1:rows + 1 + len(ends)].write(ends).result()
    rows, tokens = rows + len(ends), tokens + len(flat)
    offsets[0].write(rows).result()  # like Levanter: the row count moves only after the rows are written
    pending.clear()

  for flat, lengths in blocks:
    pending.append((flat, lengths))
    buffered += len(flat)
    if buffered >= FLUSH_TOKENS:
      flush()
      buffered = 0
  if pending:
    flush()
  return rows, tokens


def _ledger(rows: int, tokens: int, shard_rows: dict, metadata: dict, finished=True, **extra) -> dict:
  return {"total_num_rows": rows, "shard_rows": shard_rows, "is_finished": finished,
          "finished_shards": list(shard_rows), "field_counts": {FIELD: tokens}, "field_counts_by_shard": {},
          "layout": "consolidated", "metadata": {"preprocessor_metadata": metadata}, **extra}


def write(cache_dir: str, docs: Iterable[np.ndarray], metadata: dict) -> dict:
  """Writes int32 token rows as a finished cache at cache_dir (built aside, then renamed). Returns the ledger."""
  parent = os.path.dirname(os.path.abspath(cache_dir))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(dir=parent, prefix=os.path.basename(cache_dir) + ".tmp-")
  blocks = ((np.asarray(d, np.int32), np.array([len(d)], np.int64)) for d in docs)
  try:
    rows, tokens = _write_store(tmp, blocks)
    ledger = _ledger(rows, tokens, {"": rows}, metadata)
    _write_json(os.path.join(tmp, LEDGER), ledger)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)  # a SIGKILL leaves it behind instead; it is never read
    raise
  try:
    os.rename(tmp, cache_dir)
  except OSError:  # another process finished the same cache first: keep theirs
    if not os.path.exists(os.path.join(cache_dir, LEDGER)):
      raise
    shutil.rmtree(tmp, ignore_errors=True)
  return ledger


# ---- the parallel, resumable builder ----

_WORKER: dict = {}


def _init_worker(tok, progress_queue, threads: int) -> None:
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
  rows, tokens = _write_store(tmp, blocks())
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

  def __init__(self, name: str, sizes: dict[int, int], done_before: int, total_shards: int, log=_print):
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
  _WORKER.update(tok=tok, report=lambda item: (progress.update(item), progress.maybe_print()))
  for task in tasks:
    record(task[0], _encode_shard(task))


def _run_pool(tasks, tok, progress: Progress, record, workers: int) -> None:
  ctx = multiprocessing.get_context("spawn")  # fork is unsafe under JAX's and tokenizers' threads
  q = ctx.Queue()
  pool = ctx.Pool(workers, initializer=_init_worker, initargs=(tok, q, max(1, (os.cpu_count() or 1) // workers)))
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
  finally:
    pool.terminate()  # on an error or Ctrl-C, no worker outlives the build
    pool.join()


def _shard_blocks(dirs: list[str]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """The documents of finished shard stores, in order, as (flat, lengths) blocks of ~FLUSH_TOKENS."""
  for d in dirs:
    off = _open(os.path.join(d, FIELD, "offsets"))
    n = int(off[0].read().result())
    ends = off[1:n + 1].read().result().astype(np.int64) if n else np.zeros(0, np.int64)
    data = _open(os.path.join(d, FIELD, "data"))
    row, tok = 0, 0
    while row < n:
      stop = max(row + 1, int(np.searchsorted(ends, tok + FLUSH_TOKENS, side="right")))
      end = int(ends[stop - 1])
      yield data[tok:end].read().result(), np.diff(ends[row:stop], prepend=tok)
      row, tok = stop, end


def build(path: str, files: list[str], tok: tokenizers.Loaded, *, name: str, text_key: str,
          max_bad_fraction: float, num_proc: int, log=_print) -> dict:
  """Builds (or resumes, or just returns) the finished cache at path from source files; returns its ledger."""
  with _locked(path + ".lock"):
    if os.path.exists(os.path.join(path, LEDGER)):
      return _read_json(os.path.join(path, LEDGER))
    building = path + BUILDING
    ledger_path = os.path.join(building, LEDGER)
    meta = preprocessor_metadata(tok)
    state = _read_json(ledger_path) if os.path.exists(ledger_path) else None
    if state and (state["tinyjax_build"]["sources"] != files or state["metadata"]["preprocessor_metadata"] != meta):
      log(f"data: {name}: the sources or tokenizer changed since the interrupted build; starting over")
      state = None
    if state is None:
      shutil.rmtree(building, ignore_errors=True)
      os.makedirs(os.path.join(building, "shards"))
      state = _ledger(0, 0, {}, meta, finished=False, tinyjax_build={"sources": files, "files": {}})
      _write_json(ledger_path, state)
    elif state["finished_shards"]:
      log(f"data: {name}: resuming an interrupted build: {len(state['finished_shards'])}/{len(files)} files done")
    if not state["is_finished"]:
      _build_shards(building, files, tok, state, name, text_key, max_bad_fraction, num_proc, log)
    os.rename(building, path)
    return state


def _build_shards(building, files, tok, state, name, text_key, max_bad_fraction, num_proc, log) -> None:
  ledger_path, shard_dir = os.path.join(building, LEDGER), os.path.join(building, "shards")
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
    state["field_counts"][FIELD] = sum(s["tokens"] for s in state["tinyjax_build"]["files"].values())
    _write_json(ledger_path, state)

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
    shutil.rmtree(os.path.join(building, FIELD), ignore_errors=True)
    os.rename(os.path.join(dirs[0], FIELD), os.path.join(building, FIELD))
  else:
    _write_store(building, _shard_blocks(dirs))
  state["tinyjax_build"]["skipped"] = skips.as_dict()
  state["tinyjax_build"]["bytes"] = sum(s["bytes"] for s in state["tinyjax_build"]["files"].values())
  state["is_finished"] = True
  _write_json(ledger_path, state)
  shutil.rmtree(shard_dir, ignore_errors=True)


def summary(path: str) -> str:
  """One line about a finished cache: documents, tokens, skipped records."""
  ledger = _read_json(os.path.join(path, LEDGER))
  built = ledger.get("tinyjax_build") or {}
  skips = corpus.Skips()
  skips.merge(built.get("skipped") or {})
  examples = f" (first: {skips.examples[0]})" if skips.examples else ""
  return (f"{ledger['total_num_rows']:,} docs, {ledger['field_counts'][FIELD]:,} tokens"
          + (f", {built['bytes']:,} text bytes" if "bytes" in built else "")
          + (f", skipped: {skips.summary()}{examples}" if built else ", prebuilt (Levanter)"))


# ---- reading ----

def _open(path: str) -> ts.TensorStore:
  spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": os.path.abspath(path)}}
  ctx = ts.Context({"cache_pool": {"total_bytes_limit": READ_CACHE_BYTES}})
  return ts.open(spec, read=True, context=ctx).result()


class TokenCache:
  """A finished cache's flat token stream: `read(start, stop)`; tensorstore opens lazily, so it pickles cheaply."""

  def __init__(self, cache_dir: str, tokenizer_sha256: str | None = None, tokenizer_name: str | None = None,
               tokenizer_vocab_size: int | None = None):
    self.cache_dir = cache_dir
    path = os.path.join(cache_dir, LEDGER)
    if not os.path.exists(path):
      raise FileNotFoundError(f"no token cache at {cache_dir} (missing {LEDGER}); data.prepare builds it")
    self.ledger = _read_json(path)
    if not self.ledger.get("is_finished", False):
      raise RuntimeError(f"token cache at {cache_dir} is unfinished (is_finished=false in {LEDGER}): its build was "
                         "interrupted or is still running; `python -m tinyjax.data` resumes it")
    meta = (self.ledger.get("metadata") or {}).get("preprocessor_metadata") or {}
    if tokenizer_sha256 and meta.get("tokenizer_sha256"):  # ours: the exact tokenizer.json
      mismatch = meta["tokenizer_sha256"] != tokenizer_sha256
    else:  # Levanter's: only the tokenizer's name_or_path and size are recorded
      mismatch = bool(tokenizer_name and meta.get("tokenizer") and
                      not tokenizers.same_tokenizer(meta["tokenizer"], tokenizer_name))
      mismatch |= bool(tokenizer_vocab_size and meta.get("vocab_size") and meta["vocab_size"] != tokenizer_vocab_size)
    if mismatch:
      raise ConfigError(f"config.data.tokenizer={tokenizer_name!r} ({tokenizer_vocab_size} ids, sha256 "
                        f"{tokenizer_sha256}) does not match the tokenizer that built {cache_dir} "
                        f"({meta.get('tokenizer')!r}, {meta.get('vocab_size')} ids, sha256 "
                        f"{meta.get('tokenizer_sha256')}); use that tokenizer or point data.cache_dir elsewhere")
    self.metadata = meta
    shards = self.ledger.get("finished_shards") or [""]
    self._shard_dirs = [cache_dir] if self.ledger.get("layout", "consolidated") == "consolidated" else [
        s if "://" in s else os.path.join(cache_dir, s) for s in shards]
    rows, sizes = [], []
    for d in self._shard_dirs:
      off = _open(os.path.join(d, FIELD, "offsets"))
      n = int(off[0].read().result())
      rows.append(n)
      sizes.append(int(off[n].read().result()) if n else 0)
    self.num_docs = sum(rows)
    self.num_tokens = sum(sizes)
    self._starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)  # shard i holds [starts[i], starts[i+1])
    self._data = None

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_data"] = None  # tensorstore handles do not pickle; each Grain worker reopens
    return state

  def _stores(self) -> list[ts.TensorStore]:
    if self._data is None:
      self._data = [_open(os.path.join(d, FIELD, "data")) for d in self._shard_dirs]
    return self._data

  def read(self, start: int, stop: int) -> np.ndarray:
    """int32 tokens [start, stop) of the flat stream (all documents back to back)."""
    return self.read_many([(start, stop)])[0]

  def read_many(self, ranges) -> list[np.ndarray]:
    """Several [start, stop) ranges with all reads in flight at once (one tensorstore batch)."""
    stores, pieces = self._stores(), []
    with ts.Batch() as batch:
      for start, stop in ranges:
        if not 0 <= start <= stop <= self.num_tokens:
          raise IndexError(f"[{start}, {stop}) is outside the {self.num_tokens}-token stream of {self.cache_dir}")
        first = int(np.searchsorted(self._starts, start, side="right")) - 1
        futs, pos = [], start
        for i in range(max(first, 0), len(stores)):
          if pos >= stop:
            break
          end = min(stop, int(self._starts[i + 1]))
          futs.append(stores[i][pos - self._starts[i]:end - self._starts[i]].read(batch=batch))
          pos = end
        pieces.append(futs)
    out = []
    for futs in pieces:
      arrs = [f.result() for f in futs]
      out.append(np.concatenate(arrs).astype(np.int32, copy=False) if arrs else np.zeros(0, np.int32))
    return out

  def offsets(self) -> np.ndarray:
    """int64[num_docs + 1]: 0 then each document's end in the flat stream (offsets[0] replaced by 0)."""
    ends = []
    for d, base in zip(self._shard_dirs, self._starts):
      off = _open(os.path.join(d, FIELD, "offsets"))
      n = int(off[0].read().result())
      ends.append(off[1:n + 1].read().result() + base)
    return np.concatenate([[0], *ends]).astype(np.int64)


# ---- prebuilt caches ----

FETCHED = ".tinyjax-fetched"  # marks a remote cache's local mirror as complete


def fetch(url: str, root: str, log=_print) -> str:
  """The local directory of a prebuilt cache URL: a local path as is; hf:// and gs:// (anything fsspec reads)
  mirrored once under <root>/remote/ (resumable: huggingface_hub skips files it already has)."""
  if "://" not in url:
    return os.path.abspath(os.path.expanduser(url))
  if url.startswith("hf://"):
    repo_type, repo_id, revision, sub = corpus.parse_hf(url)
    base = os.path.join(root, "remote", "hf", f"{repo_type}s", repo_id.replace("/", "--") + f"@{revision or 'main'}")
  else:
    base, sub = os.path.join(root, "remote", url.replace("://", "/", 1).rstrip("/")), ""
  local = os.path.join(base, sub) if sub else base
  if os.path.exists(os.path.join(local, FETCHED)):
    return local
  log(f"data: downloading the prebuilt cache {url} -> {local}")
  try:
    if url.startswith("hf://"):
      from huggingface_hub import snapshot_download  # noqa: PLC0415
      snapshot_download(repo_id, repo_type=repo_type, revision=revision, local_dir=base,
                        allow_patterns=[f"{sub}/*"] if sub else None)
    else:
      corpus._fs(url).get(url.rstrip("/") + "/", local + "/", recursive=True)  # noqa: SLF001
  except Exception as e:  # no network, gated or missing repo: one clear line
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    raise ConfigError(f"data: downloading the prebuilt cache {url!r} failed ({type(e).__name__}: {first})") from e
  if not os.path.exists(os.path.join(local, LEDGER)):
    raise corpus.DataError(f"data: {url!r} has no {LEDGER}: expected a Levanter cache directory")
  open(os.path.join(local, FETCHED), "w").close()
  return local
