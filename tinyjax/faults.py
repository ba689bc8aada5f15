"""Preemption signals, divergence records and loss-spike warnings: how a run stops, and with which exit code."""
from __future__ import annotations

import collections
import errno
import logging
import os
import signal
import sys

EXIT_DIVERGED = 3  # a non-finite loss or gradient norm stopped the run (nothing non-finite was saved)
EXIT_LOST_HOST = 4  # another process of a multi-process run (or its host) is gone: rerun to resume (distributed.py)
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: SIGTERM/SIGINT, checkpoint written, rerun the same command to resume
NONFINITE = ((1, "loss"), (2, "grad_norm"), (4, "parameters or optimizer state after the update"))  # bits of TrainState.bad_what


def nonfinite(bits: int) -> str:
  return " and ".join(name for bit, name in NONFINITE if bits & bit) or "?"


class Preempted(Exception):
  pass


class Diverged(Exception):
  pass


class DiskFull(Exception):
  """A write failed (or would fail) for lack of space: one line and exit 2; the last complete checkpoint is intact."""


# How ENOSPC/EDQUOT read in the messages of tensorstore and Orbax (the OS error's text or number).
_FULL, _QUOTA = os.strerror(errno.ENOSPC), os.strerror(errno.EDQUOT)
_DISK_FULL_TEXT = {"No space left on device": _FULL, "os_error_code='28'": _FULL,
                   "Disk quota exceeded": _QUOTA, "os_error_code='122'": _QUOTA}


def _reason_in_text(text: str) -> str | None:
  return next((reason for marker, reason in _DISK_FULL_TEXT.items() if marker in text), None)


def disk_full_reason(exc: BaseException | None) -> str | None:
  """"No space left on device" (or the quota variant) when exc or an exception in its chain is a full disk."""
  seen = set()
  while exc is not None and id(exc) not in seen:
    seen.add(id(exc))
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
      return os.strerror(exc.errno)
    if reason := _reason_in_text(str(exc)):
      return reason
    exc = exc.__cause__ or exc.__context__
  return None


def quiet_background_noise():
  """Keeps a failed checkpoint write to the one line main prints (measured before: 806 lines, 55 tracebacks).

  Orbax logs each failed write of its background threads with a traceback, and tensorstore's late callbacks print
  "Event loop is closed" (through sys.unraisablehook) once Orbax has closed their event loop. A full disk always
  reaches the main thread too (the save's wait raises it, then faults.DiskFull), so those log records are dropped;
  the event-loop ones are never actionable. Everything else passes through unchanged. Returns a function that undoes
  it (tests).
  """
  previous = sys.unraisablehook

  def unraisable(args):
    late = isinstance(args.exc_value, RuntimeError) and str(args.exc_value) == "Event loop is closed"
    shutdown = isinstance(args.exc_value, ImportError) and "Python is likely shutting down" in str(args.exc_value)
    if not (late or shutdown):
      previous(args)
  sys.unraisablehook = unraisable

  def keep(record: logging.LogRecord) -> bool:
    return not (disk_full_reason(record.exc_info[1] if record.exc_info else None)
                or _reason_in_text(record.getMessage()))
  filtered = [*logging.getLogger().handlers, logging.getLogger("absl")]  # Orbax logs through absl.logging
  for f in filtered:
    f.addFilter(keep)

  def undo():
    sys.unraisablehook = previous
    for f in filtered:
      f.removeFilter(keep)
  return undo


class StoppedInSetup(Preempted):
  """Preempted before the loop: main leaves with os._exit (an exception raised into JAX's setup can crash the
  interpreter's teardown: exit 139 measured after a SIGTERM 4 s in)."""


def stop_during_setup() -> None:
  """Until the training loop installs Signals: a SIGTERM/SIGINT raises Preempted (exit 75, nothing to checkpoint
  yet; the lock is released by its `finally`), instead of Python's default (SIGTERM kills silently with 143)."""
  def handle(signum, frame):
    raise StoppedInSetup(f"stopped by {signal.Signals(signum).name} during setup, before any step; rerun to start")
  for s in (signal.SIGTERM, signal.SIGINT):
    signal.signal(s, handle)


class Signals:
  """First SIGTERM/SIGINT: ask the loop to checkpoint at the next step boundary. Second: exit at once.

  multiprocess: SIGTERM stays with JAX's preemption notifier (distributed.py), which makes every process stop at the
  same step; a SIGINT (Ctrl-C) is turned into that notice by re-sending SIGTERM to this process.
  """

  def __init__(self, multiprocess: bool = False):
    self.received, self.multiprocess = None, multiprocess
    ours = (signal.SIGINT,) if multiprocess else (signal.SIGTERM, signal.SIGINT)
    self._previous = {s: signal.signal(s, self._handle) for s in ours}

  def _handle(self, signum, frame):
    if self.received is not None:
      os._exit(128 + signum)  # the user insists: no checkpoint, no cleanup
    if self.multiprocess:
      self.received = signal.Signals(signum).name
      os.kill(os.getpid(), signal.SIGTERM)  # JAX's notifier: all processes agree on the checkpoint step
      return
    self.received = signal.Signals(signum).name
    print(f"received {self.received}: checkpointing at the next step boundary (send again to exit at once)",
          flush=True)

  def restore(self) -> None:
    for s, handler in self._previous.items():
      signal.signal(s, handler)


def divergence(row: dict) -> str | None:
  """The record of the first non-finite step in a metrics row, or None."""
  if row.get("first_bad_step", -1) < 0:
    return None
  return f"non-finite {nonfinite(int(row['bad_what']))} at step {int(row['first_bad_step'])}"


class SpikeDetector:
  """Warns when a logged loss exceeds `ratio` x the mean of the previous `window` logged losses."""

  def __init__(self, ratio: float, window: int):
    self.ratio, self.history = ratio, collections.deque(maxlen=window)

  def __call__(self, loss: float) -> str | None:
    spike = None
    if self.ratio > 0 and len(self.history) >= min(5, self.history.maxlen):
      mean = sum(self.history) / len(self.history)
      if loss > self.ratio * mean:
        spike = f"loss spike: {loss:.4f} > {self.ratio} x running mean {mean:.4f}"
    self.history.append(loss)
    return spike
