"""Where a run's files live: a local directory, or a remote one (`--workdir=gs://bucket/run`, any fsspec URL).

A remote workdir keeps Orbax checkpoints in place (`<workdir>/checkpoints`: Orbax and tensorstore write gs:// natively,
every process its own shards). The small files (config.json, metrics.jsonl, dynamics.jsonl, run_info.json,
speedrun_results.json, samples, tensorboard/) are written to a local mirror, because object stores cannot append,
and copied up by process 0 at every checkpoint save and when the run ends; a (re)started run first copies them
down. A resumed run cuts metrics back to its checkpoint's step, so a mirror copied up at a save is always enough.
Needs `pip install 'tinyjax[gcs]'` for gs://.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import socket
import time

from tinyjax.errors import ConfigError

# The files of a run's workdir, named once (README "A run is its workdir").
CONFIG, RUN_INFO, METRICS, DYNAMICS = "config.json", "run_info.json", "metrics.jsonl", "dynamics.jsonl"
RESULTS, SAMPLES, CHECKPOINTS, TENSORBOARD = "speedrun_results.json", "samples.json", "checkpoints", "tensorboard"
MIRRORED = (CONFIG, METRICS, DYNAMICS, RUN_INFO, RESULTS, SAMPLES, TENSORBOARD)
# What every complete checkpoint folder (CHECKPOINTS/<step>) holds (orbax-checkpoint 0.12: the manager's
# _CHECKPOINT_METADATA, and a commit_success.txt at its top and in each item); a kill while Orbax deleted one leaves
# some of them missing.
COMPLETE_CHECKPOINT = (("_CHECKPOINT_METADATA",), ("commit_success.txt",), ("state", "commit_success.txt"),
                       ("meta", "commit_success.txt"))


def complete_checkpoint(path: str) -> bool:
  """Whether the folder `path` holds a complete checkpoint (COMPLETE_CHECKPOINT)."""
  return all(os.path.exists(os.path.join(path, *part)) for part in COMPLETE_CHECKPOINT)


def read_json(workdir: str, name: str):
  """A workdir's JSON file, or None when it is missing or torn."""
  try:
    with open(os.path.join(workdir, name)) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def status(workdir: str) -> str:
  """How a run in a local workdir stands, for the programs that run many (sweep, stability): "new" (no
  run_info.json), "completed" (run_info says so and speedrun_results.json exists), "incomplete" (completed, results
  missing: a rerun writes them), else run_info's status (running, preempted, diverged, failed, disk_full, lost_host)."""
  info = read_json(workdir, RUN_INFO)
  if info is None:
    return "new"
  if info.get("status") == "completed":
    return "completed" if read_json(workdir, RESULTS) is not None else "incomplete"
  return str(info.get("status") or "unknown")


def is_remote(path: str) -> bool:
  return "://" in path and not path.startswith("file://")


class Workdir:

  def __init__(self, path: str, cache_dir: str):
    self.path = path.rstrip("/")
    self.remote = is_remote(path)
    if self.remote:
      key = hashlib.sha256(self.path.encode()).hexdigest()[:16]
      self.local = os.path.join(os.path.expanduser(cache_dir), "workdirs", key)
      try:
        import fsspec  # noqa: PLC0415
        self.fs, self.root = fsspec.core.url_to_fs(self.path)
      except (ImportError, ValueError) as e:
        raise ConfigError(f"--workdir={path}: cannot open this URL ({e}); for gs:// install the gcs extra: "
                          "pip install 'tinyjax[gcs]'") from e
      try:
        os.makedirs(self.local, exist_ok=True)
      except OSError as e:
        raise ConfigError(f"config.data.cache_dir: cannot create the local mirror {self.local} of --workdir={path}"
                          f" ({e.strerror})") from e
    else:  # created (and checked for writability) by the trainer
      self.local, self.fs, self.root = os.path.abspath(path), None, None

  @property
  def checkpoints(self) -> str:
    return f"{self.path}/checkpoints" if self.remote else os.path.join(self.local, "checkpoints")

  def pull(self) -> None:
    """Remote -> local mirror (the remote copy is the truth); every process keeps its own mirror."""
    if not self.remote:
      return
    for name in MIRRORED:
      src, dst = f"{self.root}/{name}", os.path.join(self.local, name)
      if self.fs.isdir(src):
        self.fs.get(src + "/", dst + "/", recursive=True)  # trailing slashes: the contents, not a nested copy
      elif self.fs.exists(src):
        self.fs.get(src, dst)

  def push(self) -> None:
    """Local mirror -> remote (process 0)."""
    import jax  # noqa: PLC0415 - the lock's users (tests of it) need no jax
    if not self.remote or jax.process_index() != 0:
      return
    for name in MIRRORED:
      src = os.path.join(self.local, name)
      if os.path.isdir(src):
        self.fs.put(src + "/", f"{self.root}/{name}/", recursive=True)
      elif os.path.exists(src):
        self.fs.put(src, f"{self.root}/{name}")


LOCK = ".tinyjax.lock"


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


class Lock:
  """workdir/.tinyjax.lock: held with flock(2) by the trainer using the workdir (process 0 of a run) while it runs.

  flock makes taking it atomic: of any number of processes trying at once exactly one gets it, fresh or over a file
  left behind (the former create-then-write-JSON scheme gave two holders in 37 and 107 of 200 such rounds:
  tests/runtime/test_workdir.py), and the kernel drops it when its holder dies, however (kill -9 included), so a lock is
  never stale. The JSON in the file (host, pid, start time) only names the holder in messages. A second trainer is
  refused with one line. Shared storage: Linux maps flock onto the server's POSIX locks on NFS (v4, or v3 with lockd),
  but a FUSE mount such as gcsfuse locks within one machine only, so a file naming another host is still refused
  (its run cannot be checked from here; the message says how to remove it). A remote (gs://) workdir is locked
  through its local mirror, i.e. per machine. A file system without locks (ENOLCK/EOPNOTSUPP) falls back to the pid
  check: a live pid on this host refuses, with no guarantee against a simultaneous start.
  """

  def __init__(self, local_dir: str, shown: str, active: bool = True):
    self.path, self.shown, self.active = os.path.join(local_dir, LOCK), shown, active
    self.fd: int | None = None

  @property
  def held(self) -> bool:
    return self.fd is not None

  def acquire(self) -> None:
    if not self.active:
      return
    host = socket.gethostname()
    fd, locked = self._open_locked()
    previous = self._read(fd)
    if previous.get("host") not in (None, host):
      os.close(fd)
      raise ConfigError(f"--workdir={self.shown} is locked by a tinyjax run on host {previous['host']} (pid "
                        f"{previous.get('pid')} since {previous.get('since')}); if that run is gone, delete "
                        f"{self.path}")
    pid = previous.get("pid")
    if not locked and isinstance(pid, int) and pid != os.getpid() and _alive(pid):
      os.close(fd)
      raise self._in_use(previous)
    if previous:
      print(f"warning: taking over {self.path} from pid {pid} on {host} (it exited without releasing it)", flush=True)
    mine = json.dumps({"host": host, "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, mine, 0)
    self.fd = fd

  def _open_locked(self) -> tuple[int, bool]:
    """(fd of the lock file, whether flock holds it); raises the "in use" ConfigError when another process holds it."""
    for _ in range(100):  # a holder released (unlink, then close) between our open and our flock: retry
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        other = self._read(fd, wait_s=1.0)  # the holder writes its JSON right after taking the lock
        os.close(fd)
        raise self._in_use(other) from None
      except OSError as e:
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
          os.close(fd)
          raise
        return fd, False
      try:
        same = os.path.samestat(os.fstat(fd), os.stat(self.path))
      except FileNotFoundError:
        same = False
      if same:
        return fd, True
      os.close(fd)
    raise ConfigError(f"--workdir={self.shown}: {self.path} keeps being replaced; is another trainer starting?")

  def _in_use(self, other: dict) -> ConfigError:
    return ConfigError(f"--workdir={self.shown} is in use by another tinyjax run (pid {other.get('pid', '?')} on "
                       f"{other.get('host', '?')} since {other.get('since', '?')}); wait for it, stop it, or use "
                       "another workdir")

  @staticmethod
  def _read(fd: int, wait_s: float = 0.0) -> dict:
    deadline = time.monotonic() + wait_s
    while True:
      try:
        value = json.loads(os.pread(fd, 4096, 0) or b"null")
      except ValueError:
        value = None
      if isinstance(value, dict) or time.monotonic() >= deadline:
        return value if isinstance(value, dict) else {}
      time.sleep(0.01)

  def release(self) -> None:
    if self.fd is None:
      return
    try:
      os.remove(self.path)  # while still holding it: a process that opened this file then sees it replaced
    except FileNotFoundError:
      pass
    os.close(self.fd)
    self.fd = None
