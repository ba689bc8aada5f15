"""Where a run's files live: a local directory, or a remote one (`--workdir=gs://bucket/run`, any fsspec URL).

A remote workdir keeps Orbax checkpoints in place (`<workdir>/checkpoints`: Orbax and tensorstore write gs:// natively,
every process its own shards). The small files (config.json, metrics.jsonl, dynamics.jsonl, run_info.json,
speedrun_results.json, samples, tensorboard/) are written to a local mirror, because object stores cannot append,
and copied up by process 0 at every checkpoint save and when the run ends; a (re)started run first copies them
down. A resumed run cuts metrics back to its checkpoint's step, so a mirror copied up at a save is always enough.
Needs `pip install 'tinyjax[gcs]'` for gs://.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import time

import jax

from tinyjax.config import ConfigError

MIRRORED = ("config.json", "metrics.jsonl", "dynamics.jsonl", "run_info.json", "speedrun_results.json",
            "samples.txt", "samples.json", "tensorboard")


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
  """workdir/.tinyjax.lock: host, pid and start time of the trainer using the workdir (process 0 of a run).

  A second trainer is refused with one line. A lock left by a killed trainer (kill -9: its pid is gone on this
  host) is stale and taken over; a lock from another host cannot be checked from here, so the message says how to
  remove it when that host's run is known to be gone.
  """

  def __init__(self, local_dir: str, shown: str):
    self.path, self.shown, self.held = os.path.join(local_dir, LOCK), shown, False

  def acquire(self) -> None:
    if jax.process_index() != 0:
      return
    mine = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(2):
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        other = self._read()
        if other.get("host") == mine["host"] and isinstance(other.get("pid"), int) and _alive(other["pid"]) \
            and other["pid"] != mine["pid"]:
          raise ConfigError(f"--workdir={self.shown} is in use by another tinyjax run (pid {other['pid']} on "
                            f"{other['host']} since {other.get('since')}); wait for it, stop it, or use another "
                            "workdir") from None
        if other.get("host") not in (None, mine["host"]):
          raise ConfigError(f"--workdir={self.shown} is locked by a tinyjax run on host {other['host']} (pid "
                            f"{other.get('pid')} since {other.get('since')}); if that run is gone, delete "
                            f"{self.path}") from None
        print(f"warning: taking over the stale lock {self.path} ({other or 'unreadable'}: that process is gone)",
              flush=True)
        os.remove(self.path)
        continue
      with os.fdopen(fd, "w") as f:
        json.dump(mine, f)
      self.held = True
      return

  def _read(self) -> dict:
    try:
      with open(self.path) as f:
        value = json.load(f)
      return value if isinstance(value, dict) else {}
    except (OSError, ValueError):
      return {}

  def release(self) -> None:
    if self.held:
      try:
        os.remove(self.path)
      except FileNotFoundError:
        pass
      self.held = False
