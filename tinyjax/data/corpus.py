"""Document sources named by URL: which files a URL names (`expand`), and the documents of one file (`read`).

A source is one of:
  builtin:python-docs/{train,validation}
    The offline corpus: one document per Python Language Reference topic (pydoc_data.topics, ~465 KB of prose) and
    per stdlib module/class/function docstring of >= 200 chars (ast over sysconfig's stdlib dir, sorted; test dirs
    and site-packages skipped), deduplicated; a stable hash of each text sends ~5% to validation.
  a file, local or remote (gs://, hf://datasets/ORG/NAME[@REV]/..., anything fsspec opens), globs and {a,b} /
  {000..123} braces allowed, by format (Levanter UrlDatasetSourceConfig):
    .jsonl / .json  one JSON object per line, text under data.text_key (allenai/c4 `en` shards: .json.gz with
                    text, timestamp, url); a .json whose first line is not an object is one JSON array of objects
    .parquet        a data.text_key column (FineWeb-Edu)
    .txt            one document per line, newline included (Levanter TextUrlDataSource)
    each optionally compressed: .gz, .bz2, .xz
  a prebuilt Levanter cache: any other URL (a directory holding shard_ledger.json), used as-is (cache.py).

Bad input inside a file (invalid JSON or UTF-8, no text field) is skipped and counted in `Skips`, unless more than
data.max_bad_fraction of a file's records are bad: then, like a corrupt/truncated gzip, it is a DataError naming the
file, line and what was expected. Empty documents and empty files are skipped and counted.
"""
from __future__ import annotations

import ast
import bz2
import collections
import dataclasses
import functools
import glob as globlib
import gzip
import hashlib
import itertools
import json
import lzma
import os
import platform
import re
import sysconfig
import warnings
import zlib
from pydoc_data.topics import topics
from typing import Iterator

from tinyjax.errors import ConfigError

BUILTIN_PREFIX = "builtin:python-docs/"
BUILTIN_SPLITS = ("train", "validation")
VALIDATION_PERCENT = 5  # sha256(text) % 100 < 5 -> validation; by content, so duplicates never straddle splits
MIN_DOCSTRING_CHARS = 200
# Bump when the extraction rules change: it is part of the cache key (see source_id).
BUILTIN_VERSION = 1
_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})
FORMATS = (".jsonl", ".json", ".parquet", ".txt")
COMPRESSIONS = {".gz": gzip.GzipFile, ".bz2": bz2.BZ2File, ".xz": lzma.LZMAFile}
PARQUET_BATCH_ROWS = 1024
SKIP_EXAMPLES = 5  # first few skipped records kept, with file and line, for the ledger and the summary


class DataError(ConfigError):
  """A bad input file: the message names the file, the line or record, and what was expected."""


# ---- the built-in corpus ----

def _stdlib_files() -> list[str]:
  root = sysconfig.get_paths()["stdlib"]
  files = []
  for path, dirs, names in os.walk(root):
    dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS)
    files.extend(os.path.join(path, n) for n in sorted(names) if n.endswith(".py"))
  return files


def docstrings(path: str) -> list[str]:
  """Docstrings (>= MIN_DOCSTRING_CHARS) of a file's module, classes and functions, in ast.walk order."""
  try:
    with open(path, "rb") as f, warnings.catch_warnings():
      warnings.simplefilter("ignore")  # old files raise SyntaxWarning (invalid escapes); the text is still fine
      tree = ast.parse(f.read())
  except (SyntaxError, ValueError, UnicodeDecodeError, OSError):
    return []  # e.g. lib2to3 test data, bad encodings: skipped
  kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
  docs = (ast.get_docstring(n) for n in ast.walk(tree) if isinstance(n, kinds))
  return [d for d in docs if d and len(d) >= MIN_DOCSTRING_CHARS]


def is_validation(text: str) -> bool:
  return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little") % 100 < VALIDATION_PERCENT


@functools.lru_cache(maxsize=1)
def _python_docs() -> dict[str, tuple[str, ...]]:
  """All built-in documents (~6 s of ast parsing on 2 cores, so cached per process), split by content hash."""
  seen, splits = set(), {s: [] for s in BUILTIN_SPLITS}
  texts = [topics[k] for k in sorted(topics)] + [d for p in _stdlib_files() for d in docstrings(p)]
  for text in texts:
    if text.strip() and text not in seen:
      seen.add(text)
      splits["validation" if is_validation(text) else "train"].append(text)
  return {k: tuple(v) for k, v in splits.items()}


def _builtin_split(url: str) -> str:
  split = url[len(BUILTIN_PREFIX):]
  if split not in BUILTIN_SPLITS:
    raise ConfigError(f"data.train_urls / data.validation_urls: unknown built-in source {url!r}; built-in sources: "
                      f"{', '.join(BUILTIN_PREFIX + s for s in BUILTIN_SPLITS)}")
  return split


# ---- URLs ----

def _is_remote(url: str) -> bool:
  return "://" in url


def file_format(url: str) -> tuple[str, str] | None:
  """(format, compression) from the name, e.g. ('.jsonl', '.gz') for c4-train.00000-of-01024.json.gz; None if
  the URL names no supported file (a prebuilt cache directory)."""
  stem, comp = os.path.splitext(url.rstrip("/"))
  if comp not in COMPRESSIONS:
    stem, comp = url.rstrip("/"), ""
  ext = os.path.splitext(stem)[1]
  return (ext, comp) if ext in FORMATS else None


def kind(url: str) -> str:
  """'builtin' | 'file' | 'cache' (a prebuilt Levanter cache directory)."""
  if url.startswith("builtin:"):
    return "builtin"
  return "file" if file_format(url) else "cache"


def braces(url: str) -> list[str]:
  """Bash-style {a,b} and zero-padded {000..123} expansion (Levanter braceexpands its URLs)."""
  m = re.search(r"\{([^{}]*)\}", url)
  if not m:
    return [url]
  body = m.group(1)
  r = re.fullmatch(r"(\d+)\.\.(\d+)", body)
  if r:
    width = len(r.group(1)) if r.group(1).startswith("0") else 0
    items = [str(i).zfill(width) for i in range(int(r.group(1)), int(r.group(2)) + 1)]
  else:
    items = body.split(",")
  return [out for item in items for out in braces(url[:m.start()] + item + url[m.end():])]


def _fs(url: str):
  import fsspec  # noqa: PLC0415  (remote filesystems are imported only when used)
  try:
    return fsspec.core.url_to_fs(url)[0]
  except ImportError as e:  # e.g. gs:// without gcsfs
    raise ConfigError(f"data: cannot open {url!r}: {e}") from e


def expand(url: str, key: str = "data.train_urls") -> list[str]:
  """The files a source URL names, in a fixed (sorted) order; a glob matching nothing is a ConfigError."""
  if kind(url) != "file":
    return [url]
  out = []
  for one in braces(url):
    if not any(c in one for c in "*?["):
      if not _is_remote(one) and not os.path.isfile(os.path.expanduser(one)):
        raise DataError(f"config.{key}: {one!r}: no such file")
      out.append(one if _is_remote(one) else os.path.abspath(os.path.expanduser(one)))
      continue
    if _is_remote(one):
      fs = _fs(one)
      found = sorted(fs.unstrip_protocol(p) for p in fs.glob(one))
    else:
      found = sorted(os.path.abspath(p) for p in globlib.glob(os.path.expanduser(one)) if os.path.isfile(p))
    if not found:
      raise DataError(f"config.{key}: {one!r} matched no files")
    out.extend(found)
  return out


def source_id(url: str) -> str:
  """A cheap identity of what `url` yields, for cache keys: read offline, without listing or opening anything."""
  if kind(url) == "builtin":
    _builtin_split(url)  # the text comes from this Python build's stdlib
    return f"{url}@v{BUILTIN_VERSION}/{platform.python_implementation()}-{platform.python_version()}"
  return url if _is_remote(url) else os.path.abspath(os.path.expanduser(url))


def parse_hf(url: str) -> tuple[str, str, str | None, str]:
  """hf://datasets/ORG/NAME[@REV]/PATH -> (repo_type, repo_id, revision, path), as HfFileSystem spells it."""
  m = re.fullmatch(r"hf://(?:(datasets|spaces|models)/)?([^/@]+/[^/@]+)(?:@([^/]+))?(?:/(.*))?", url.rstrip("/"))
  if not m:
    raise ConfigError(f"data: {url!r} is not an hf:// URL of the form hf://datasets/ORG/NAME[@REVISION]/PATH")
  repo_type = {"datasets": "dataset", "spaces": "space"}.get(m.group(1), "model")
  return repo_type, m.group(2), m.group(3), m.group(4) or ""


# ---- reading one file ----

@dataclasses.dataclass
class Skips:
  """What a read skipped: counts by reason, and the first few with file:line, for the ledger and the summary."""
  counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  examples: list = dataclasses.field(default_factory=list)
  records: int = 0  # records seen (lines / rows), bad ones included

  def add(self, reason: str, where: str, why: str) -> None:
    self.counts[reason] += 1
    if len(self.examples) < SKIP_EXAMPLES:
      self.examples.append(f"{where}: {reason}: {why}")

  def merge(self, other: dict) -> None:
    self.counts.update(other.get("counts", {}))
    self.records += other.get("records", 0)
    self.examples.extend(other.get("examples", [])[:max(0, SKIP_EXAMPLES - len(self.examples))])

  def as_dict(self) -> dict:
    return {"counts": dict(sorted(self.counts.items())), "examples": list(self.examples), "records": self.records}

  def summary(self) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(self.counts.items())) or "none"


BAD = ("bad_json", "bad_utf8", "missing_text")  # records that count toward data.max_bad_fraction


def check_bad_fraction(skips: Skips, url: str, max_bad_fraction: float) -> None:
  bad = sum(skips.counts[k] for k in BAD)
  if bad and bad > max_bad_fraction * skips.records:
    first = next(e for e in skips.examples if any(f": {k}: " in e for k in BAD))
    raise DataError(f"{first} ({bad} of {skips.records} records of {url} are unreadable, more than "
                    f"data.max_bad_fraction={max_bad_fraction}; fix the file or raise that key to skip them)")


def _text_of(record, text_key: str, where: str, skips: Skips) -> str | None:
  if not isinstance(record, dict):
    skips.add("bad_json", where, f"expected a JSON object, got {type(record).__name__}")
    return None
  text = record.get(text_key)
  if not isinstance(text, str):
    why = (f"no {text_key!r} field (data.text_key); keys: {sorted(record)[:8]}" if text is None
           else f"{text_key!r} is {type(text).__name__}, expected a string")
    skips.add("missing_text", where, why)
    return None
  return text


def _json_lines(f, url: str, text_key: str, skips: Skips) -> Iterator[tuple[int, str]]:
  for n, raw in enumerate(f, 1):
    skips.records += 1
    where = f"{url}:{n}"
    try:
      line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
      skips.add("bad_utf8", where, f"invalid UTF-8 at byte {e.start}")
      continue
    if n == 1 and line.lstrip().startswith("["):  # a .json file holding one array (Levanter sniffs the same way)
      skips.records -= 1
      yield from _json_array(line + b"".join(f).decode("utf-8"), url, text_key, skips)
      return
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      skips.add("bad_json", where, f"invalid JSON ({e.msg} at column {e.colno})")
      continue
    text = _text_of(record, text_key, where, skips)
    if text is not None:
      yield n, text


def _json_array(content: str, url: str, text_key: str, skips: Skips) -> Iterator[tuple[int, str]]:
  try:
    records = json.loads(content)
  except json.JSONDecodeError as e:
    raise DataError(f"{url}:{e.lineno}: invalid JSON ({e.msg}); expected one JSON object per line or one array "
                    "of objects") from e
  for i, record in enumerate(records if isinstance(records, list) else [records]):
    skips.records += 1
    text = _text_of(record, text_key, f"{url}[{i}]", skips)
    if text is not None:
      yield i, text


def _text_lines(f, url: str, skips: Skips) -> Iterator[tuple[int, str]]:
  for n, raw in enumerate(f, 1):
    skips.records += 1
    try:
      yield n, raw.decode("utf-8")
    except UnicodeDecodeError as e:
      skips.add("bad_utf8", f"{url}:{n}", f"invalid UTF-8 at byte {e.start}")


def _parquet(f, url: str, text_key: str, skips: Skips, progress) -> Iterator[tuple[int, str]]:
  import pyarrow as pa  # noqa: PLC0415
  import pyarrow.parquet as pq  # noqa: PLC0415
  try:
    pf = pq.ParquetFile(f)
  except (pa.ArrowException, OSError) as e:
    raise DataError(f"{url}: not a readable parquet file ({e}); expected a parquet file with a "
                    f"{text_key!r} column") from e
  if text_key not in pf.schema_arrow.names:
    raise DataError(f"{url}: no column {text_key!r} (data.text_key); columns: {pf.schema_arrow.names}")
  row, total = 0, max(pf.metadata.num_rows, 1)
  try:
    for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[text_key]):
      for text in batch.column(0).to_pylist():
        skips.records += 1
        if isinstance(text, str):
          yield row, text
        else:
          skips.add("missing_text", f"{url} row {row}", f"{text_key!r} is {type(text).__name__}, expected a string")
        row += 1
      progress(row / total)
  except pa.ArrowException as e:
    raise DataError(f"{url} row {row}: unreadable parquet data ({e})") from e


def _open_raw(url: str):
  if _is_remote(url):
    return _fs(url).open(url, "rb")
  return open(os.path.expanduser(url), "rb")


def read(url: str, text_key: str, skips: Skips, progress=lambda fraction: None) -> Iterator[str]:
  """The documents of one file, in order; bad records go to `skips`, a broken file raises DataError.
  `progress(fraction)` is called now and then with the fraction of the (compressed) file consumed."""
  if kind(url) == "builtin":
    yield from _python_docs()[_builtin_split(url)]
    return
  fmt, comp = file_format(url)
  n = 0
  with _open_raw(url) as raw:
    size = (raw.size if hasattr(raw, "size") and isinstance(raw.size, int) else os.fstat(raw.fileno()).st_size) or 1
    f = COMPRESSIONS[comp](fileobj=raw) if comp else raw
    if fmt == ".parquet":
      docs = _parquet(f, url, text_key, skips, progress)
    elif fmt == ".txt":
      docs = _text_lines(f, url, skips)
    else:
      docs = _json_lines(f, url, text_key, skips)
    try:
      for n, text in docs:
        if text == "":
          skips.add("empty_docs", f"{url}:{n}", "empty text")
        else:
          yield text
        if skips.records % 4096 == 0:
          progress(raw.tell() / size)
    except (EOFError, OSError, zlib.error, lzma.LZMAError) as e:  # gzip.BadGzipFile is an OSError
      raise DataError(f"{url}: corrupt or truncated {comp or fmt} data after record {skips.records} ({e}); "
                      "expected a complete file: re-download it") from e
  if skips.records == 0:
    skips.add("empty_files", url, "no records")
  progress(1.0)


def documents(url: str, text_key: str = "text") -> Iterator[str]:
  """All documents of a source URL (every file it names, in order), skipping bad records."""
  files = expand(url)  # raises now, not at the first next()
  return itertools.chain.from_iterable(read(f, text_key, Skips()) for f in files)
