"""Whole-file writes that never leave a torn or partial file (a kill or a full disk keeps the previous version), and
the check that a directory can be written."""
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


def probe_write(directory: str) -> None:
  """Creates `directory` and writes and removes a file in it (OSError if it cannot); per-pid name, so the processes
  of one run never race on the same probe."""
  os.makedirs(directory, exist_ok=True)
  probe = os.path.join(directory, f".tinyjax-write-test-{os.getpid()}")
  with open(probe, "w") as f:
    f.write("ok")
  os.remove(probe)
