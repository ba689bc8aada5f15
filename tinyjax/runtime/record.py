"""workdir/run_info.json: what ran, where, with what — the planned run plus versions, devices, host, git state,
config hash, environment in force, start/end times and how the run ended."""
from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import json
import os
import platform
import socket
import subprocess
import sys

import jax

from tinyjax.runtime import files, workdir as workdirs

PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "tensorstore", "tokenizers", "numpy",
            "ml_collections", "absl-py", "libtpu", "libtpu-nightly", "jax-cuda12-plugin", "jax-cuda13-plugin",
            "jax-cuda12-pjrt", "jax-cuda13-pjrt", "nvidia-cudnn-cu12", "nvidia-cudnn-cu13")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def versions() -> dict:
  out = {"python": platform.python_version()}
  for name in PACKAGES:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      pass  # optional accelerator packages are recorded only when installed
  return out


def git_state() -> dict | None:
  """Commit, whether the tree is dirty, and a hash of the diff (the exact code that ran), or None outside git."""
  def git(*args):
    return subprocess.run(["git", "-C", REPO, *args], capture_output=True, text=True, timeout=10, check=True).stdout
  try:
    diff = git("diff", "HEAD")
    return {"commit": git("rev-parse", "HEAD").strip(), "dirty": bool(git("status", "--porcelain").strip()),
            "diff_sha256": hashlib.sha256(diff.encode()).hexdigest() if diff else None}
  except (OSError, subprocess.SubprocessError):
    return None


def devices() -> dict:
  d = jax.devices()[0]
  return {"backend": jax.default_backend(), "device_kind": d.device_kind, "device_count": jax.device_count(),
          "local_device_count": jax.local_device_count(), "process_count": jax.process_count(),
          "process_index": jax.process_index(), "platform_version": getattr(d.client, "platform_version", None)}


def config_sha256(cfg) -> str:
  return hashlib.sha256(cfg.to_json_best_effort(sort_keys=True).encode()).hexdigest()


def start(workdir: str, cfg, plan_info: dict) -> dict:
  """Writes run_info.json (process 0) at the start of a run; returns it."""
  info = {**plan_info, "versions": versions(), "devices": devices(), "host": socket.gethostname(),
          "argv": sys.argv, "git": git_state(), "config_sha256": config_sha256(cfg), "start_time": _now(),
          "end_time": None, "status": "running"}
  _write(workdir, info)
  return info


def finish(workdir: str, info: dict, status: str) -> None:
  info.update(end_time=_now(), status=status)
  _write(workdir, info)


def _write(workdir: str, info: dict) -> None:
  if jax.process_index() == 0:
    files.atomic_write(os.path.join(workdir, workdirs.RUN_INFO), json.dumps(info, indent=2, sort_keys=True, default=str))
