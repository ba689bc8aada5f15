"""Stop signals (SIGTERM/SIGINT/SIGHUP) at any moment of a program's life, the background noise of a failed write or
a stop kept off the one line, and worker processes that end with their parent. How each ending is reported:
tinyjax/errors.py."""
from __future__ import annotations

import atexit
import contextlib
import logging
import os
import select
import signal
import sys
import threading
import time

from tinyjax import errors

# Orbax's WARNING on every process of a multi-process stop, relayed before tinyjax's one line, which names the step.
_SAID_BY_US = "Reached preemption sync point"


def quiet_background_noise():
  """Keeps a failed checkpoint write to the one line main prints (without this: hundreds of lines and tracebacks).

  Orbax logs each failed write of its background threads with a traceback, and tensorstore's late callbacks print
  "Event loop is closed" (through sys.unraisablehook) once Orbax has closed their event loop. A full disk always
  reaches the main thread too (the save's wait raises it, then errors.DiskFull), so those log records are dropped;
  the event-loop ones are never actionable; Orbax's "Reached preemption sync point" is said by tinyjax's stop line.
  Everything else passes through unchanged. Returns a function that undoes it (tests).
  """
  previous = sys.unraisablehook

  def unraisable(args):
    late = isinstance(args.exc_value, RuntimeError) and str(args.exc_value) == "Event loop is closed"
    shutdown = isinstance(args.exc_value, ImportError) and "Python is likely shutting down" in str(args.exc_value)
    if not (late or shutdown):
      previous(args)
  sys.unraisablehook = unraisable

  def keep(record: logging.LogRecord) -> bool:
    return not (errors.disk_full_reason(record.exc_info[1] if record.exc_info else None)
                or errors.disk_full_text(record.getMessage()) or _SAID_BY_US in record.getMessage())
  # multiprocessing's resource tracker (a process of its own, started with this process's -W options) warns about
  # "leaked semaphore objects" after a parent that died abruptly (kill -9, or the stop-signal backstop): it cleans
  # them up itself, so the warning is noise on the one-line exit.
  tracker_quiet = "ignore::UserWarning:multiprocessing.resource_tracker"
  added = tracker_quiet not in sys.warnoptions
  if added:
    sys.warnoptions.append(tracker_quiet)
  filtered = [*logging.getLogger().handlers, logging.getLogger("absl")]  # Orbax logs through absl.logging
  for f in filtered:
    f.addFilter(keep)

  def undo():
    sys.unraisablehook = previous
    if added:
      sys.warnoptions.remove(tracker_quiet)
    for f in filtered:
      f.removeFilter(keep)
  return undo


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)  # SIGHUP: the terminal or ssh session went away
# A stop during setup waits this long for a safe point. The setup steps without one (an XLA compile, an Orbax
# restore, a download) are single calls that cannot be interrupted, and nothing they write can be torn by an exit
# (caches, checkpoints and records are written atomically); 10 s is well inside the ~30 s between SIGTERM and SIGKILL
# of Cloud TPU/GCE preemptions, SLURM (KillWait) and Kubernetes (terminationGracePeriodSeconds).
SETUP_GRACE_S = 10.0
_told = threading.Lock()  # acquired by whoever prints a setup stop's one line (main, or the backstop): printed once


def tell_once(line: str) -> None:
  if _told.acquire(blocking=False):
    print(line, file=sys.stderr, flush=True)


class Signals:
  """The one handler of SIGTERM, SIGINT and SIGHUP for a run's life (installed by `handling_signals`).

  Signals are handled by a thread of their own, woken through Python's signal wakeup fd, so the main thread is never
  interrupted and never needs to be free: a handler raising in the main thread would land wherever it happens to be
  (inside the restore's `except Exception`, which would call a good checkpoint unreadable; inside JAX's gc callback,
  where Python only prints "Exception ignored"), and a Python-level handler waits for the main thread to leave a long
  C call (an XLA compile). The thread records the first signal; the run acts on it where it is safe:
    setup (phase "setup": the data build, restore, compile, anything before the first step): the next `stop_point()`
      raises StoppedInSetup (main: one line, exit 75); in the programs (grace_s=SETUP_GRACE_S), if none comes in
      time, the thread prints the same line and exits 75;
    the training loop (phase "loop"): a checkpoint at the next step boundary, then exit 75;
    after the loop ("done"): the run's records are finished; main skips the samples.
  A second signal exits at once (128 + its number): no checkpoint, no cleanup.
  multiprocess (set once jax.distributed runs): SIGTERM belongs to JAX's preemption notifier, which makes every
  process stop at the same step; SIGINT and SIGHUP are turned into that notice by re-sending SIGTERM to this process.
  """

  def __init__(self, during_setup: str = "during setup, before any step; rerun the same command to continue",
               grace_s: float | None = None):
    self.received: str | None = None
    self.phase, self.during_setup, self.multiprocess, self.forwarded = "setup", during_setup, False, False
    self.grace_s = grace_s  # None (library use, e.g. train.run in a notebook): no exit from the thread in setup
    self._previous: dict = {}
    self._thread: threading.Thread | None = None
    self._count = 0  # stop signals the thread has seen

  def install(self, keep_handlers: bool = False) -> None:
    if threading.current_thread() is not threading.main_thread():
      return  # Python lets only the main thread handle signals
    self._r, self._w = os.pipe()
    os.set_blocking(self._w, False)  # the C-level handler writes each signal's number here, never blocking
    if not keep_handlers:
      self._previous = {s: signal.signal(s, self._record) for s in STOP_SIGNALS}
    previous_fd = signal.set_wakeup_fd(self._w, warn_on_full_buffer=False)
    if not keep_handlers:
      self._previous_fd = previous_fd
    self._thread = threading.Thread(target=self._watch, daemon=True, name="tinyjax-signals")
    self._thread.start()

  def forked(self, child: bool) -> None:
    """After os.fork (distributed.supervise): both processes share the wakeup pipe, but only the parent kept the
    watcher thread, so the supervisor would act on the trainer's signals (measured: a SIGHUP forwarded to the trainer,
    then its own SIGTERM notice, read by the supervisor as two signals: exit 129). The trainer gets a pipe and a
    watcher of its own; the supervisor stops watching (it only forwards signals)."""
    if self._thread is None:
      return
    old_r, old_w = self._r, self._w
    if child:
      os.close(old_r)
      os.close(old_w)
      self._thread = None
      self.install(keep_handlers=True)
    else:
      signal.set_wakeup_fd(-1)
      os.write(old_w, b"\0")  # ends the thread
      self._thread.join()
      os.close(old_r)
      os.close(old_w)
      self._thread = None

  def restore(self) -> None:
    if self._thread is None:
      return
    signal.set_wakeup_fd(self._previous_fd)
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    os.write(self._w, b"\0")  # ends the thread
    self._thread.join()
    os.close(self._r)
    os.close(self._w)
    self._thread = None

  def _watch(self) -> None:
    deadline = None  # grace_s after a stop signal during setup
    while True:
      wait = None if deadline is None else max(0.0, deadline - time.monotonic())
      if not select.select([self._r], [], [], wait)[0]:
        if self.phase in ("setup", "stopping"):  # no safe point came, or the exit after one is stuck
          tell_once(f"tinyjax: {self.setup_message()}")
          os._exit(errors.EXIT_PREEMPTED)
        deadline = None
        continue
      for signum in os.read(self._r, 64):
        if signum == 0:
          return
        if signum in STOP_SIGNALS and self._first(signum) and deadline is None and self.grace_s is not None:
          deadline = time.monotonic() + self.grace_s

  def _first(self, signum: int) -> bool:
    """Records a first signal (a second one exits); True when it came during setup."""
    if self._count:
      os._exit(128 + signum)  # the user insists: no checkpoint, no cleanup
    self._count += 1
    if self.multiprocess and signum != signal.SIGTERM:
      self.forwarded = True  # before `received`: no stop_point may act on it alone
      self.received = signal.Signals(signum).name
      os.kill(os.getpid(), signal.SIGTERM)  # JAX's notifier: all processes agree on the checkpoint step
      return False
    self.received = self.received or signal.Signals(signum).name
    if self.phase == "loop":
      print(f"received {self.received}: checkpointing at the next step boundary (send again to exit at once)",
            flush=True)
    return self.phase in ("setup", "stopping")

  def _record(self, signum, frame) -> None:
    """The Python-level handler, run by the main thread between two bytecodes: it records the signal too, so that
    one a step sends itself (tests) is seen at that step's boundary, whatever the thread's timing. Never raises."""
    if self.received is None and not self.multiprocess:
      self.received = signal.Signals(signum).name

  def setup_message(self) -> str:
    return f"stopped by {self.received} {self.during_setup}"

  def stop_point(self) -> None:
    """A safe point of setup: raises StoppedInSetup once a stop signal has arrived."""
    if self.received is not None and self.phase == "setup" and not self.forwarded:
      self.phase = "stopping"
      raise errors.StoppedInSetup(self.setup_message())


_ACTIVE: Signals | None = None


@contextlib.contextmanager
def handling_signals(during_setup: str | None = None, grace_s: float | None = None):
  """Installs the process's Signals for the block, or yields the ones already in force (main's, inside train.run).
  grace_s: the programs' bound on a stop during setup (SETUP_GRACE_S); None leaves the exit to the caller."""
  global _ACTIVE
  if _ACTIVE is not None:
    yield _ACTIVE
    return
  _ACTIVE = Signals(*([during_setup] if during_setup else []), grace_s=grace_s)
  _ACTIVE.install()
  try:
    yield _ACTIVE
  finally:
    _ACTIVE.restore()
    _ACTIVE = None


def handle_signals_for_life(during_setup: str | None = None, grace_s: float | None = None) -> Signals:
  """A program's Signals, installed at its first line and never restored: restored at the end, a stop signal while
  the interpreter exits (the run complete, Orbax's and JAX's teardown still running) met the default action and
  killed the finished run (exit 129/143, measured by benchmarks.chaos). Now it is recorded and the program ends with
  its own code; a second one still exits at once."""
  global _ACTIVE
  _ACTIVE = Signals(*([during_setup] if during_setup else []), grace_s=grace_s)
  _ACTIVE.install()
  atexit.register(_ignore_stop_signals)  # registered first, so it runs after every other exit handler
  return _ACTIVE


def _ignore_stop_signals() -> None:
  """The last exit handler: Python's finalization then resets every handler it installed to the default action
  (CPython's _PySignal_Fini; an ignored signal stays ignored), and a signal in those last milliseconds killed a
  finished run (exit 129, measured by benchmarks.chaos). Until here a second signal still exits at once."""
  for s in STOP_SIGNALS:
    signal.signal(s, signal.SIG_IGN)


def forked(child: bool) -> None:
  """Tells the process's Signals about an os.fork (see Signals.forked)."""
  if _ACTIVE is not None:
    _ACTIVE.forked(child)


def stop_point() -> None:
  """A safe point of setup (data build, restore, compile): raises StoppedInSetup once a stop signal has arrived."""
  if _ACTIVE is not None:
    _ACTIVE.stop_point()


def received() -> str | None:
  """The stop signal this process has received, if any."""
  return _ACTIVE.received if _ACTIVE is not None else None


PARENT_PID_ENV = "_TINYJAX_PARENT_PID"  # set by every process that imports tinyjax: the parent its workers watch
_WATCHING = False  # this process watches its parent already


def watch_parent(parent: int) -> None:
  """Exits this process at once, silently, when `parent` has exited (now, if it already has): a daemon thread waits
  on a pidfd (Linux >= 5.3), else polls every 0.2 s. Not PR_SET_PDEATHSIG: that fires when the *thread* that started
  this process ends, and Grain starts its workers from short-lived threads. Idempotent."""
  global _WATCHING
  if _WATCHING:
    return
  if os.getppid() != parent:
    os._exit(1)
  _WATCHING = True
  threading.Thread(target=_wait_for_exit, args=(parent,), daemon=True, name="tinyjax-parent-watch").start()


def _wait_for_exit(parent: int) -> None:
  try:
    fd = os.pidfd_open(parent)
    if os.getppid() == parent:  # still ours once the pidfd is open: it cannot name a reused pid
      select.select([fd], [], [])
  except (AttributeError, OSError):
    while os.getppid() == parent:
      time.sleep(0.2)
  os._exit(1)


def watch_parent_if_spawned() -> None:
  """Called when tinyjax is imported. A process that multiprocessing spawned from a tinyjax program (the cache
  builder's pool, Grain's prefetch workers) imports tinyjax while it still unpickles its work (its parent's main
  module, or its task), so from this moment it dies with its parent (a kill -9 of the parent leaves no worker
  behind, and none ends in an UnpicklingError traceback). Their initializers call watch_parent too (a parent that is
  no tinyjax program: a script)."""
  import multiprocessing.process  # noqa: PLC0415
  parent = os.environ.get(PARENT_PID_ENV, "")
  if getattr(multiprocessing.process.current_process(), "_inheriting", False) and parent.isdigit():
    watch_parent(int(parent))
  os.environ[PARENT_PID_ENV] = str(os.getpid())


