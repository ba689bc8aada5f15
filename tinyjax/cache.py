"""Token caches in Levanter's TreeCache layout, so caches built by Levanter/Marin read as-is (and ours in Levanter).

One directory per split:
  shard_ledger.json   CacheLedger (levanter/store/cache.py): total_num_rows, shard_rows, is_finished, finished_shards,
                      field_counts, field_counts_by_shard, layout, metadata{preprocessor_metadata{tokenizer,
                      vocab_size, append_bos, append_eos, ...}}; we add tokenizer_sha256 to preprocessor_metadata.
  input_ids/offsets   zarr3 int64, declared shape [2^54]: offsets[0] = number of rows (documents),
                      offsets[1..n] = cumulative end of each row in data (levanter/store/jagged_array.py)
  input_ids/data      zarr3 int32, declared shape [2^54]: the documents' token ids back to back
Both arrays use Levanter's _get_spec: regular chunks of 2^27 elements, each a `sharding_indexed` shard of 2^18-element
inner chunks compressed with blosc clevel 5. Levanter's newer "sharded" layout (one such store per shard
subdirectory, listed in finished_shards) is read as the concatenation of its shards.

A build writes into <dir>.tmp-<random> and renames it into place after the ledger says is_finished, so a killed
build never looks complete.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from typing import Iterable

import numpy as np
import tensorstore as ts

from tinyjax.config import ConfigError

LEDGER = "shard_ledger.json"
FIELD = "input_ids"
INNER_CHUNK = 256 * 1024  # Levanter DEFAULT_CHUNK_SIZE: 1 MiB of int32
SHARD_CHUNK = INNER_CHUNK * 512  # Levanter DEFAULT_WRITE_CHUNK_SIZE
DECLARED_SIZE = 2**54  # Levanter creates every array this long; offsets[0]/offsets[n] say what is used
# Writes rewrite the shard they touch, so flush in big pieces (<= 8 rewrites of a 2^27-token shard).
FLUSH_TOKENS = SHARD_CHUNK // 8
READ_CACHE_BYTES = 256 << 20  # decoded-chunk cache per reader: random windows reuse 1 MiB inner chunks


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


def preprocessor_metadata(tok) -> dict:
  """What Levanter's BatchTokenizer.metadata records, plus the hash that pins the exact tokenizer.json."""
  return {"tokenizer": tok.name, "vocab_size": tok.vocab_size, "return_attention_mask": False, "padding": False,
          "max_length": None, "append_bos": tok.bos_id is not None, "append_eos": True,
          "tokenizer_sha256": tok.sha256}


def write(cache_dir: str, docs: Iterable[np.ndarray], metadata: dict) -> dict:
  """Writes int32 token rows as a finished cache at cache_dir (built aside, then renamed). Returns the ledger."""
  parent = os.path.dirname(os.path.abspath(cache_dir))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(dir=parent, prefix=os.path.basename(cache_dir) + ".tmp-")
  try:
    ledger = _write_into(tmp, docs, metadata)
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


def _write_into(tmp: str, docs: Iterable[np.ndarray], metadata: dict) -> dict:
  offsets = _create(os.path.join(tmp, FIELD, "offsets"), ts.int64)
  data = _create(os.path.join(tmp, FIELD, "data"), ts.int32)
  rows, tokens, pending = 0, 0, []

  def flush():
    nonlocal rows, tokens
    flat = np.concatenate(pending)
    ends = tokens + np.cumsum([len(p) for p in pending], dtype=np.int64)
    data[tokens:tokens + len(flat)].write(flat).result()
    offsets[rows + 1:rows + 1 + len(ends)].write(ends).result()
    rows, tokens = rows + len(ends), tokens + len(flat)
    offsets[0].write(rows).result()  # like Levanter: the row count moves only after the rows are written
    pending.clear()

  buffered = 0
  for doc in docs:
    pending.append(np.asarray(doc, np.int32))
    buffered += len(doc)
    if buffered >= FLUSH_TOKENS:
      flush()
      buffered = 0
  if pending:
    flush()
  ledger = {"total_num_rows": rows, "shard_rows": {"": rows}, "is_finished": True, "finished_shards": [""],
            "field_counts": {FIELD: tokens}, "field_counts_by_shard": {}, "layout": "consolidated",
            "metadata": {"preprocessor_metadata": metadata}}
  with open(os.path.join(tmp, LEDGER), "w", encoding="utf-8") as f:
    json.dump(ledger, f, indent=1)
  return ledger


def _open(path: str) -> ts.TensorStore:
  spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": os.path.abspath(path)}}
  ctx = ts.Context({"cache_pool": {"total_bytes_limit": READ_CACHE_BYTES}})
  return ts.open(spec, read=True, context=ctx).result()


class TokenCache:
  """A finished cache's flat token stream: `read(start, stop)`; tensorstore opens lazily, so it pickles cheaply."""

  def __init__(self, cache_dir: str, tokenizer_sha256: str | None = None, tokenizer_name: str | None = None):
    self.cache_dir = cache_dir
    path = os.path.join(cache_dir, LEDGER)
    if not os.path.exists(path):
      raise FileNotFoundError(f"no token cache at {cache_dir} (missing {LEDGER}); data.prepare builds it")
    with open(path, encoding="utf-8") as f:
      self.ledger = json.load(f)
    if not self.ledger.get("is_finished", False):
      raise RuntimeError(f"token cache at {cache_dir} is unfinished (is_finished=false in {LEDGER}): its build was "
                         "interrupted or is still running; delete the directory to rebuild it")
    meta = (self.ledger.get("metadata") or {}).get("preprocessor_metadata") or {}
    if tokenizer_sha256 and meta.get("tokenizer_sha256"):  # ours: the exact tokenizer.json
      mismatch = meta["tokenizer_sha256"] != tokenizer_sha256
    else:  # Levanter's: only the tokenizer's name_or_path is recorded
      mismatch = bool(tokenizer_name and meta.get("tokenizer") not in (None, tokenizer_name))
    if mismatch:
      raise ConfigError(f"config.data.tokenizer={tokenizer_name!r} (sha256 {tokenizer_sha256}) does not match the "
                        f"tokenizer that built {cache_dir} ({meta.get('tokenizer')!r}, sha256 "
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
