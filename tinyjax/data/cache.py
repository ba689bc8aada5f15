"""Token caches in Levanter's TreeCache layout, so caches built by Levanter/Marin read as-is (and ours in Levanter):
the layout, a writer, the reader, and mirroring remote prebuilt caches.

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
Building caches from source files in parallel is builder.py.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Iterable

import numpy as np
import tensorstore as ts

from tinyjax.errors import ConfigError
from tinyjax.data import corpus, tokenizer as tokenizers
from tinyjax.runtime import files

LEDGER = "shard_ledger.json"
FIELD = "input_ids"
INNER_CHUNK = 256 * 1024  # Levanter DEFAULT_CHUNK_SIZE: 1 MiB of int32
SHARD_CHUNK = INNER_CHUNK * 512  # Levanter DEFAULT_WRITE_CHUNK_SIZE
DECLARED_SIZE = 2**54  # Levanter creates every array this long; offsets[0]/offsets[n] say what is used
# Writes rewrite the shard they touch, so flush in big pieces (<= 8 rewrites of a 2^27-token shard).
FLUSH_TOKENS = SHARD_CHUNK // 8
READ_CACHE_BYTES = 256 << 20  # decoded-chunk cache per reader: random windows reuse 1 MiB inner chunks


def log(message: str) -> None:
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


def write_json(path: str, obj) -> None:
  files.atomic_write(path, json.dumps(obj, indent=1))


def _remote(path: str) -> bool:
  return "://" in path and not path.startswith("file://")


def exists(path: str) -> bool:
  """os.path.exists, also for gs:// (and other fsspec) URLs of caches read in place."""
  if not _remote(path):
    return os.path.exists(path)
  return corpus._fs(path).exists(path)  # noqa: SLF001


def read_json(path: str):
  if _remote(path):
    with corpus._fs(path).open(path, "r") as f:  # noqa: SLF001
      return json.load(f)
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def write_store(path: str, blocks: Iterable[tuple[np.ndarray, np.ndarray]]) -> tuple[int, int]:
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


def new_ledger(rows: int, tokens: int, shard_rows: dict, metadata: dict, finished=True, **extra) -> dict:
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
    rows, tokens = write_store(tmp, blocks)
    ledger = new_ledger(rows, tokens, {"": rows}, metadata)
    write_json(os.path.join(tmp, LEDGER), ledger)
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


def summary(path: str) -> str:
  """One line about a finished cache: documents, tokens, skipped records."""
  ledger = read_json(os.path.join(path, LEDGER))
  built = ledger.get("tinyjax_build") or {}
  skips = corpus.Skips()
  skips.merge(built.get("skipped") or {})
  examples = f" (first: {skips.examples[0]})" if skips.examples else ""
  return (f"{ledger['total_num_rows']:,} docs, {ledger['field_counts'][FIELD]:,} tokens"
          + (f", {built['bytes']:,} text bytes" if "bytes" in built else "")
          + (f", skipped: {skips.summary()}{examples}" if built else ", prebuilt (Levanter)"))


# ---- reading ----

def open_store(path: str) -> ts.TensorStore:
  # gs://: tensorstore's own GCS driver reads the chunks it needs (TENSORSTORE_GCS_HTTP_URL points it at an emulator)
  kvstore = path.rstrip("/") + "/" if _remote(path) else {"driver": "file", "path": os.path.abspath(path)}
  spec = {"driver": "zarr3", "kvstore": kvstore}
  ctx = ts.Context({"cache_pool": {"total_bytes_limit": READ_CACHE_BYTES}})
  return ts.open(spec, read=True, context=ctx).result()


class TokenCache:
  """A finished cache's flat token stream: `read(start, stop)`; tensorstore opens lazily, so it pickles cheaply."""

  def __init__(self, cache_dir: str, tokenizer_sha256: str | None = None, tokenizer_name: str | None = None,
               tokenizer_vocab_size: int | None = None):
    self.cache_dir = cache_dir
    path = os.path.join(cache_dir, LEDGER)
    if not exists(path):
      raise FileNotFoundError(f"no token cache at {cache_dir} (missing {LEDGER}); data.prepare builds it")
    self.ledger = read_json(path)
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
      off = open_store(os.path.join(d, FIELD, "offsets"))
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
      self._data = [open_store(os.path.join(d, FIELD, "data")) for d in self._shard_dirs]
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
      off = open_store(os.path.join(d, FIELD, "offsets"))
      n = int(off[0].read().result())
      ends.append(off[1:n + 1].read().result() + base)
    return np.concatenate([[0], *ends]).astype(np.int64)


# ---- prebuilt caches ----

FETCHED = ".tinyjax-fetched"  # marks a remote cache's local mirror as complete


def fetch(url: str, root: str, log=log) -> str:
  """The directory a prebuilt cache is read from: a local path as is; gs:// in place (tensorstore reads only the
  chunks a run needs, from every host, without a full copy per host); hf:// (and other fsspec URLs) mirrored once
  under <root>/remote/ (resumable: huggingface_hub skips files it already has)."""
  if "://" not in url:
    return os.path.abspath(os.path.expanduser(url))
  if url.startswith("gs://"):
    return url.rstrip("/")
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
