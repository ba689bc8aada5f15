"""Document sources named by URL: `documents(url)` yields one string per document.

Supported now (offline: every Python install has the text):
  builtin:python-docs/train, builtin:python-docs/validation
    One document per Python Language Reference topic (pydoc_data.topics, ~465 KB of prose) and per stdlib module/class/
    function docstring of >= 200 chars (ast over sysconfig's stdlib dir, sorted; test dirs and site-packages skipped),
    deduplicated; a stable hash of each text sends ~5% to validation.
Later schemes (https://, gs://, hf:// for C4/FineWeb/Paloma) add an entry to `_SCHEMES`.
"""
from __future__ import annotations

import ast
import functools
import hashlib
import os
import platform
import sysconfig
import warnings
from typing import Iterator

from pydoc_data.topics import topics

from tinyjax.config import ConfigError

BUILTIN_PREFIX = "builtin:python-docs/"
BUILTIN_SPLITS = ("train", "validation")
VALIDATION_PERCENT = 5  # sha256(text) % 100 < 5 -> validation; by content, so duplicates never straddle splits
MIN_DOCSTRING_CHARS = 200
# Bump when the extraction rules change: it is part of the cache key (see source_id).
BUILTIN_VERSION = 1
_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})


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


def _unsupported(url: str) -> ConfigError:
  return ConfigError(
      f"data.train_urls / data.validation_urls: unsupported source {url!r}; supported now: "
      f"{BUILTIN_PREFIX}{{{','.join(BUILTIN_SPLITS)}}} (real corpora such as C4/FineWeb/Paloma arrive later)")


def _builtin_split(url: str) -> str:
  split = url[len(BUILTIN_PREFIX):] if url.startswith(BUILTIN_PREFIX) else ""
  if split not in BUILTIN_SPLITS:
    raise _unsupported(url)
  return split


def _builtin_id(url: str) -> str:
  _builtin_split(url)  # the text comes from this Python build's stdlib
  return f"{url}@v{BUILTIN_VERSION}/{platform.python_implementation()}-{platform.python_version()}"


# scheme -> (documents(url), source_id(url))
_SCHEMES = {"builtin": (lambda url: iter(_python_docs()[_builtin_split(url)]), _builtin_id)}


def _scheme(url: str):
  scheme = url.split(":", 1)[0] if ":" in url else ""
  if scheme not in _SCHEMES:
    raise _unsupported(url)
  return _SCHEMES[scheme]


def source_id(url: str) -> str:
  """A cheap identity of what `url` yields, for cache keys (no documents are read)."""
  return _scheme(url)[1](url)


def documents(url: str) -> Iterator[str]:
  """The documents of one source, in a fixed order; a bad URL raises here, not at the first next()."""
  return _scheme(url)[0](url)
