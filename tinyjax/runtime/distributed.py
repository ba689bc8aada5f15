"""The multi-process runtime: `jax.distributed.initialize` before anything touches a device, the topology record,
the agreements every process must reach (data ready, when to stop), and what happens when a process is lost.

distributed.mode (config):
  "auto"  initialise when JAX's cluster detection finds a multi-process job: SLURM (srun sets SLURM_JOB_ID,
          SLURM_NTASKS > 1, SLURM_PROCID, ...), Open MPI (mpirun), or a multi-host Cloud TPU VM slice; or when
          distributed.coordinator_address is set. A single process otherwise (laptops, one GPU, one TPU VM host).
  "on"    always initialise (JAX's detection fills whatever coordinator/num_processes/process_id are unset).
  "off"   never.
Preemption: with several processes, SIGTERM is left to JAX's preemption notifier (a Python handler would hide it),
so any host's notice makes every process reach `multihost_utils.reached_preemption_sync_point` at the same step,
checkpoint there and exit 75 together.

A lost process (killed, crashed, its host gone): every other process prints one line and exits 4
(errors.EXIT_LOST_HOST), the last complete checkpoint intact, within distributed.heartbeat_timeout_s + ~10 s. It
shows up in one of three ways, and each ends in `lost_host_line`:
  1. a collective fails (CPU/Gloo: "Connection reset by peer", within 1 s): `errors.peer_lost` recognises the error and
     `leave_lost_host` exits at once (os._exit: JAX's teardown would wait for the lost process, then abort);
  2. JAX's coordination service notices it (missed heartbeats after heartbeat_timeout_s, or the coordinator's
     connection closing, within ~1 s) and *aborts the process from C++* (LOG(FATAL) -> SIGABRT, ~80 lines of traces).
     jaxlib 0.10.2 offers no usable hook (its missed_heartbeat_callback cannot pass the status to Python: measured
     std::bad_cast -> terminate), so a multi-process run is supervised: the launched process forks the trainer,
     relays its output and signals, and turns that abort into the one line (JAX's report is saved to a file);
  3. no step finishes for distributed.step_timeout_s (a process alive but stuck): the watchdog exits.
"""
from __future__ import annotations

import os
import re
import select
import signal
import sys
import tempfile
import threading
import time

import jax

from tinyjax import errors
from tinyjax.errors import ConfigError
from tinyjax.runtime import faults


def _detected_cluster():
  """JAX's cluster environment (SLURM, Open MPI, TPU slice, ...) this process belongs to, or None."""
  from jax._src import clusters  # noqa: PLC0415 - jax.distributed.initialize uses the same registry
  for env in clusters.ClusterEnv._cluster_types:  # noqa: SLF001
    try:
      if not env.opt_in_only_method and env.is_env_present():
        return env
    except Exception:  # noqa: BLE001 - a detector probing an absent environment (e.g. TPU metadata) is "no"
      continue
  return None


def _topology_guess(explicit: dict, cluster) -> tuple[int | None, int | None]:
  """(process index, count) as far as known before jax.distributed starts (for the supervisor's line)."""
  try:
    index = explicit.get("process_id", cluster.get_process_id() if cluster else None)
    count = explicit.get("num_processes", cluster.get_process_count() if cluster else None)
  except Exception:  # noqa: BLE001 - a detector that cannot tell: the line says "this process"
    return None, None
  return index, count


def initialize(d) -> dict:
  """Starts jax.distributed if config.distributed asks for it; returns the topology (also for single runs)."""
  if d.mode not in ("auto", "on", "off"):
    raise ConfigError(f"config.distributed.mode={d.mode!r} is invalid: allowed: auto, on, off")
  explicit = {k: v for k, v in (("coordinator_address", d.coordinator_address or None),
                                ("num_processes", d.num_processes or None),
                                ("process_id", d.process_id if d.process_id >= 0 else None)) if v is not None}
  cluster = None if d.mode == "off" or explicit else _detected_cluster()
  detected = cluster.get_process_count() if cluster else None
  start = d.mode == "on" or (d.mode == "auto" and (explicit or (detected or 1) > 1))
  if start:
    supervise(*_topology_guess(explicit, cluster))  # from here on this is the trainer (a child process)
    try:
      jax.distributed.initialize(**explicit, initialization_timeout=d.initialization_timeout_s,
                                 heartbeat_timeout_seconds=d.heartbeat_timeout_s)
    except (RuntimeError, ValueError) as e:
      raise ConfigError(f"jax.distributed.initialize failed ({str(e).strip().splitlines()[0]}); check "
                        "config.distributed.* or the cluster environment (SLURM_*, mpirun, TPU VM)") from e
  # No jax.process_count() here: it would start the backend, which env.start_backend does next (and checks).
  return {"initialized": bool(start), "detected_processes": detected,
          "coordinator_address": explicit.get("coordinator_address"), "mode": d.mode}


def is_multiprocess() -> bool:
  return jax.process_count() > 1


def barrier(name: str) -> None:
  """Every process waits here until all have arrived (no-op for one process)."""
  if is_multiprocess():
    from jax.experimental import multihost_utils  # noqa: PLC0415
    multihost_utils.sync_global_devices(name)


def preempted(step: int, local_signal: str | None) -> bool:
  """True on every process at the same step after any process received SIGTERM (or, alone, after a signal)."""
  if not is_multiprocess():
    return local_signal is not None
  from jax.experimental import multihost_utils  # noqa: PLC0415
  return multihost_utils.reached_preemption_sync_point(step)


# ---- A lost process: recognising it, and the one line ----

_LEAVING = threading.Lock()  # one line, even when the watchdog and the main thread notice at the same moment


def _who(index: int | None, count: int | None) -> str:
  return f"process {index} of {count}" if index is not None and count else "this process"


def lost_host_line(index: int | None, count: int | None, evidence: str) -> str:
  return (f"tinyjax: error: lost host: {_who(index, count)}: {evidence}; another process of this run (or its host) is gone; "
          f"exiting with code {errors.EXIT_LOST_HOST} (rerun the same command to resume from the last checkpoint)")


def leave_lost_host(evidence: str) -> None:
  """Prints the one line and exits 4 at once. Never returns: the cleanup a normal exit runs (Orbax's wait, JAX's
  shutdown barrier) waits for the lost process and then aborts with C++ traces (measured: 78 s, 79 lines)."""
  _LEAVING.acquire()  # a second caller waits here for the exit
  sys.stdout.flush()
  sys.stderr.flush()
  line = lost_host_line(jax.process_index(), jax.process_count(), evidence)
  os.write(2, (line + "\n").encode())
  os._exit(errors.EXIT_LOST_HOST)


class Watchdog:
  """Exits with one clear line when no step finishes for `timeout_s` seconds in a multi-process run: a process
  that is alive but stuck holds the others in a collective forever (a dead one is noticed sooner, see above).
  `beat()` after every step; it also covers the final checkpoint wait; 0 or one process = off."""

  def __init__(self, timeout_s: float):
    self.timeout_s, self.last = timeout_s, time.monotonic()
    self._stop = threading.Event()
    if timeout_s > 0 and is_multiprocess():
      threading.Thread(target=self._watch, daemon=True, name="tinyjax-watchdog").start()

  def beat(self) -> None:
    self.last = time.monotonic()

  def stop(self) -> None:
    self._stop.set()

  def _watch(self) -> None:
    while not self._stop.wait(min(5.0, self.timeout_s / 4)):
      idle = time.monotonic() - self.last
      if idle > self.timeout_s:
        leave_lost_host(f"no training step or checkpoint wait finished for {idle:.0f}s "
                        f"(config.distributed.step_timeout_s={self.timeout_s:g})")


# ---- The supervisor: JAX aborts the process when its coordination service reports a lost peer ----

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
# JAX logs a lost peer and aborts within milliseconds (measured 0.2 s); native log lines are held back this long so
# that the abort's ~80 lines can be replaced by one. Lines of a trainer that keeps running are printed after it.
HOLD_S = 10.0
_NATIVE_LINE = re.compile(rb"^(?:[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S+:\d+\]|\*\*\* |Fatal Python error|"
                          rb"terminate called)")
# JAX's preemption notifier logs each SIGTERM it catches ("W... preemption_notifier.cc:90] SIGTERM caught at ...");
# the stop's one line says it, and the line was relayed before it (measured by benchmarks.chaos): dropped.
_SAID_BY_TINYJAX = re.compile(rb"^[IW]\d{4} .*\bpreemption_notifier\.cc:\d+\] SIGTERM caught at ")
_JAX_ABORT = ("JAX distributed service detected fatal errors", "heartbeat", "unhealthy", "coordination service")
# How JAX's abort for a lost peer ends the trainer: SIGABRT (LOG(FATAL)). The survivor of a coordinator killed
# mid-save was once seen to die of SIGSEGV instead, under load (not reproduced in 10 runs; another thread, e.g. the
# save's, can touch the runtime the abort tears down): after JAX's report, a crash is the same lost host.
_CRASHES = (signal.SIGABRT, signal.SIGSEGV, signal.SIGBUS)


def supervise(index: int | None, count: int | None) -> None:
  """Forks. The child returns (it is the trainer); this process relays the child's stderr and the signals it
  receives, exits with the child's code, and turns an abort of JAX's for a lost peer into the one line and exit 4.
  A child whose supervisor is killed is killed too (the launcher's view of the process is the supervisor)."""
  sys.stdout.flush()
  sys.stderr.flush()
  read_fd, write_fd = os.pipe()
  # The forwarding handlers are in place before the fork: a signal that comes before the trainer's pid is known waits
  # in `early` (before, one right after the fork killed the supervisor and the trainer ran on without its notice).
  # The trainer starts with these signals blocked and unblocks them once its own handlers are back.
  trainer, early = [], []

  def forward(signum, frame):
    if trainer:
      _forward(trainer[0], signum)
    else:
      early.append(signum)

  previous = {s: signal.signal(s, forward) for s in FORWARDED_SIGNALS}
  mask = signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED_SIGNALS)
  parent, pid = os.getpid(), os.fork()
  if pid == 0:
    for s, handler in previous.items():  # None: a handler installed outside Python (none is, before this point)
      signal.signal(s, signal.SIG_DFL if handler is None else handler)
  else:
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
  faults.forked(child=pid == 0)
  if pid == 0:
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    os.close(read_fd)
    _die_with(parent)
    os.setpgid(0, 0)  # a terminal's Ctrl-C reaches the supervisor alone, which forwards it once
    os.dup2(write_fd, 2)
    os.close(write_fd)
    return
  os.close(write_fd)
  trainer.append(pid)
  for signum in early:
    _forward(pid, signum)
  relay = _Relay(read_fd)
  _exit_as(os.waitstatus_to_exitcode(relay.run(pid)), relay, index, count)


def _die_with(parent: int) -> None:
  """Linux: the kernel SIGKILLs this process when `parent` dies (a killed host takes its trainer with it)."""
  try:
    import ctypes  # noqa: PLC0415
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
  except OSError:  # not glibc Linux: the child outlives a killed supervisor
    return
  if os.getppid() != parent:  # the parent died before prctl took effect
    os._exit(128 + signal.SIGKILL)


def _forward(pid: int, signum: int) -> None:
  try:
    os.kill(pid, signum)
  except ProcessLookupError:
    pass


def _write(data: bytes) -> None:
  try:
    os.write(2, data)
  except OSError:  # our stderr is gone (a closed pipe): keep supervising, the exit code still tells
    pass


class _Relay:
  """Copies the trainer's stderr to ours line by line, holding native log lines (and what follows them) back for
  HOLD_S seconds so that JAX's abort for a lost peer can be replaced by one line."""

  def __init__(self, fd: int):
    self.fd, self.partial, self.held, self.until = fd, b"", [], None

  def run(self, pid: int) -> int:
    """Relays until the child has exited and its stderr is drained (1 s at most); returns its wait status."""
    status, eof, drain_until = None, False, None
    while status is None or not (eof or time.monotonic() >= drain_until):
      if status is None:
        done, wait_status = os.waitpid(pid, os.WNOHANG)
        if done:
          status, drain_until = wait_status, time.monotonic() + 1.0
      if status is None and self.until is not None and time.monotonic() >= self.until:
        self.release()
      if eof:
        time.sleep(0.1)
      elif select.select([self.fd], [], [], 0.1)[0]:
        chunk = os.read(self.fd, 1 << 16)
        eof = not chunk
        self.feed(chunk)
    return status

  def feed(self, chunk: bytes) -> None:
    *lines, self.partial = (self.partial + chunk).split(b"\n")
    for line in lines:
      if _SAID_BY_TINYJAX.match(line):
        continue
      if self.held or _NATIVE_LINE.match(line):
        self.held.append(line + b"\n")
        self.until = self.until or time.monotonic() + HOLD_S
      else:
        _write(line + b"\n")

  def release(self) -> None:
    _write(b"".join(self.held) + self.partial)
    self.held, self.partial, self.until = [], b"", None

  def text(self) -> str:
    return b"".join(self.held + [self.partial]).decode(errors="replace")


def _exit_as(code: int, relay: _Relay, index: int | None, count: int | None) -> None:
  """Leaves with the child's exit code (or dies of its signal); a lost peer is exit 4 and one line."""
  held = relay.text()
  lost = code == errors.EXIT_LOST_HOST or (-code in _CRASHES and any(m in held for m in _JAX_ABORT))
  if not lost:
    relay.release()
    if code == -signal.SIGKILL:  # nothing of the trainer's can say why (no handler runs): the one line says it
      _write(f"{killed_line(index, count)}\n".encode())
    if code < 0:
      _die_of(-code)
    os._exit(code)
  ours = [line for line in held.splitlines() if line.startswith("tinyjax:")]
  report = _save_report(held) if held.strip() else None
  if not ours and code != errors.EXIT_LOST_HOST:  # JAX aborted before the trainer could say anything
    saved = f" (JAX's report: {report})" if report else ""
    ours = [lost_host_line(index, count, _abort_evidence(held, index) + saved)]
  _write("".join(f"{line}\n" for line in ours).encode())
  os._exit(errors.EXIT_LOST_HOST)


def killed_line(index: int | None, count: int | None) -> str:
  return (f"tinyjax: error: {_who(index, count)}: the trainer was killed by SIGKILL (the kernel's out-of-memory killer, or kill -9); "
          f"exiting with code {128 + signal.SIGKILL} (rerun the same command to resume from the last checkpoint)")


def _die_of(signum: int) -> None:
  """Ends this process by the signal its trainer died of, so the shell sees the same (128 + N). SIGKILL and SIGSTOP
  cannot have a handler (signal.signal raises OSError for them): they are sent as they are."""
  if signum not in (signal.SIGKILL, signal.SIGSTOP):
    signal.signal(signum, signal.SIG_DFL)
  os.kill(os.getpid(), signum)
  time.sleep(1.0)  # a blocked or ignored signal: leave with the shell's number for it instead
  os._exit(128 + signum)


def _abort_evidence(text: str, index: int | None) -> str:
  """What JAX's coordination service said, in a few words."""
  if index != 0 and re.search(r"Socket closed|Connection reset by peer|Connection refused|[Ff]ailed to connect", text):
    return "the coordinator (process 0) stopped answering JAX's coordination service"
  tasks = re.search(r"unhealthy \(stopped sending heartbeats\):\s*([\d, \n]+)", text) or \
      re.search(r"Task (\d+) heartbeat timeout", text)
  if tasks:
    ids = tasks.group(1).split()
    return f"process{'es' * (len(ids) > 1)} {', '.join(ids)} stopped sending heartbeats to JAX's coordination service"
  return "JAX's coordination service reported a failed process and aborted the trainer"


def _save_report(text: str) -> str | None:
  """Keeps what JAX printed when it aborted (nothing is lost, the console gets one line); returns the path."""
  try:
    fd, path = tempfile.mkstemp(prefix="tinyjax-lost-host-", suffix=".log")
    with os.fdopen(fd, "w") as f:
      f.write(text)
    return path
  except OSError:
    return None
