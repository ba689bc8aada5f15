"""Whole-file writes that never leave a torn or partial file: a kill or a full disk keeps the previous version."""
from __future__ import annotations

import os
import tempfile


def atomic_write(path: str, text: str) -> None:
  """Writes text to a temporary file beside path, then renames it over path; on failure removes the temporary."""
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=os.path.basename(path) + ".", suffix=".tmp")
  try:
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      f.write(text)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
