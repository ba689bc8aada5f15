"""How a tinyjax program ends, declared once: the exit codes, the exceptions that mean a planned ending (a user
mistake, a stop, a divergence, a full disk, a lost peer, a refused compile), and `ending`, the one table that maps an
exception to its run status, exit code and one line. Imports nothing of tinyjax and no JAX at import time: every
program, launcher and worker process can read it.
"""
from __future__ import annotations

import dataclasses
import errno
import os

# README's table; the launchers rerun 75 and 4.
EXIT_BUG = 1  # an unexpected error: its traceback (and a target compile that failed: the compiler's own)
EXIT_USAGE = 2  # a user mistake, or a full disk: one line, nothing lost
EXIT_DIVERGED = 3  # a non-finite loss or gradient norm stopped the run (nothing non-finite was saved)
EXIT_LOST_HOST = 4  # another process of a multi-process run (or its host) is gone: rerun to resume (distributed.py)
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: SIGTERM/SIGINT/SIGHUP, checkpoint written (or none yet), rerun to resume
EXIT_NOT_READY = 69  # EX_UNAVAILABLE: launch.tpu babysit saw no READY VM within --ready-timeout-s; rerunning carries on


class ConfigError(ValueError):
  """A user mistake in the config: the message names the key and what is allowed."""


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


def disk_full_text(text: str) -> str | None:
  """The full disk a message (an exception's, a log record's) reports, or None."""
  return next((reason for marker, reason in _DISK_FULL_TEXT.items() if marker in text), None)


class CompileFailed(RuntimeError):
  """A target's compiler rejected the step (aot.py; a bug to fix: every shipped config must compile)."""


@dataclasses.dataclass(frozen=True)
class Ending:
  """How a run that stopped on purpose ends: the one declaration of statuses, exit codes and their lines."""
  status: str  # run_info.json's "status"
  code: int  # the process's exit code (README's table)
  line: str  # its one line on stderr
  now: bool = False  # leave with os._exit: pending background work (Orbax's writes) would only add tracebacks
  evidence: str = ""  # a lost host: what showed it (distributed.leave_lost_host prints the line)


# What a collective or a coordination call raises when the process at the other end is gone (CPU collectives:
# Gloo's "Read error ...: Connection reset by peer"; the coordination service: "Socket closed", "unhealthy").
_PEER_GONE = ("Connection reset by peer", "Connection closed by peer", "Socket closed", "Broken pipe",
              "Connection refused", "heartbeat", "unhealthy", "Gloo", "Barrier failed", "coordination service")


def peer_lost(exc: BaseException | None) -> str | None:
  """The error's first line when exc (or one in its chain) is a collective or coordination call failing because
  another process is gone; None otherwise, and always None in a single-process run. JAX raises these as
  JaxRuntimeError, or as ValueError from a jitted call (measured: Orbax's sync_global_devices -> "ValueError:
  UNKNOWN: Gloo AllGather failed: ... Connection closed by peer")."""
  if isinstance(exc, ConfigError) or not _distributed():
    return None
  for e in chain(exc):
    text = str(e).strip()
    if isinstance(e, (RuntimeError, ValueError)) and any(marker in text for marker in _PEER_GONE):
      return text.splitlines()[0][:240]
  return None


def ending(exc: BaseException, where: str = "") -> Ending | None:
  """The Ending of a run that raised exc, or None for a bug (status "failed", exit 1 with its traceback)."""
  if isinstance(exc, ConfigError):
    return Ending("failed", EXIT_USAGE, f"tinyjax: error: {exc}")
  full = in_chain(exc, DiskFull)  # e.g. a failed save, then run_info.json's write failing too
  if full is not None:
    return Ending("disk_full", EXIT_USAGE, f"tinyjax: error: {full}", now=True)
  if isinstance(exc, Preempted):  # stopped alone in setup, several processes: JAX's exit would wait for the others
    alone = isinstance(exc, StoppedInSetup) and _distributed()
    return Ending("preempted", EXIT_PREEMPTED, f"tinyjax: {exc}", now=alone)
  if isinstance(exc, Diverged):
    return Ending("diverged", EXIT_DIVERGED, f"tinyjax: diverged: {exc}")
  if isinstance(exc, CompileFailed):  # the child's traceback is the story; the parent's would only hide it
    return Ending("failed", EXIT_BUG, f"tinyjax: error: {exc}", now=True)
  if lost := peer_lost(exc):  # e.g. a barrier during setup or restore, or the final checkpoint's wait
    return Ending("lost_host", EXIT_LOST_HOST, "", evidence=f"a collective or coordination call failed ({lost})")
  if reason := disk_full_reason(exc):  # a full disk anywhere else: metrics, records, caches
    return Ending("disk_full", EXIT_USAGE, f"tinyjax: error: disk full ({reason}) writing "
                  f"{getattr(exc, 'filename', None) or where}: free space and rerun (it resumes from the last "
                  "checkpoint)", now=True)
  return None


def _distributed() -> bool:
  import jax  # noqa: PLC0415 - errors stays importable without jax (worker processes)
  return jax.distributed.is_initialized()


def chain(exc: BaseException | None):
  """exc, then its cause (or context), and so on: each exception once."""
  seen = set()
  while exc is not None and id(exc) not in seen:
    seen.add(id(exc))
    yield exc
    exc = exc.__cause__ or exc.__context__


def in_chain(exc: BaseException | None, kind: type) -> BaseException | None:
  """The first exception of type `kind` in exc's chain (itself, its cause or context, ...), or None."""
  return next((e for e in chain(exc) if isinstance(e, kind)), None)


def disk_full_reason(exc: BaseException | None) -> str | None:
  """"No space left on device" (or the quota variant) when exc or an exception in its chain is a full disk."""
  for e in chain(exc):
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
      return os.strerror(e.errno)
    if reason := disk_full_text(str(e)):
      return reason
  return None


class StoppedInSetup(Preempted):
  """A stop signal before the first step (nothing to checkpoint yet): one line, exit 75, rerun to continue."""
