"""The multi-process runtime: `jax.distributed.initialize` before anything touches a device, the topology record,
and the agreements every process must reach (data ready, when to stop, that no host is lost).

distributed.mode (config):
  "auto"  initialise when JAX's cluster detection finds a multi-process job: SLURM (srun sets SLURM_JOB_ID,
          SLURM_NTASKS > 1, SLURM_PROCID, ...), Open MPI (mpirun), or a multi-host Cloud TPU VM slice; or when
          distributed.coordinator_address is set. A single process otherwise (laptops, one GPU, one TPU VM host).
  "on"    always initialise (JAX's detection fills whatever coordinator/num_processes/process_id are unset).
  "off"   never.
Preemption: with several processes, SIGTERM is left to JAX's preemption notifier (a Python handler would hide it),
so any host's notice makes every process reach `multihost_utils.reached_preemption_sync_point` at the same step,
checkpoint there and exit 75 together. A lost host: the others' next collective fails or hangs; the watchdog turns
either into one clear line and exit code 4 after distributed.step_timeout_s without a finished step.
"""
from __future__ import annotations

import os
import sys
import threading
import time

import jax

from tinyjax.config import ConfigError

EXIT_LOST_HOST = 4  # another process of this run is gone (killed, crashed, or lost its host)


def _detected_process_count() -> int | None:
  """Processes of the cluster job this process belongs to, by JAX's own detection; None outside one."""
  from jax._src import clusters  # noqa: PLC0415 - jax.distributed.initialize uses the same registry
  for env in clusters.ClusterEnv._cluster_types:  # noqa: SLF001
    try:
      if not env.opt_in_only_method and env.is_env_present():
        return env.get_process_count()
    except Exception:  # noqa: BLE001 - a detector probing an absent environment (e.g. TPU metadata) is "no"
      continue
  return None


def initialize(d) -> dict:
  """Starts jax.distributed if config.distributed asks for it; returns the topology (also for single runs)."""
  if d.mode not in ("auto", "on", "off"):
    raise ConfigError(f"config.distributed.mode={d.mode!r} is invalid: allowed: auto, on, off")
  explicit = {k: v for k, v in (("coordinator_address", d.coordinator_address or None),
                                ("num_processes", d.num_processes or None),
                                ("process_id", d.process_id if d.process_id >= 0 else None)) if v is not None}
  detected = None if d.mode == "off" or explicit else _detected_process_count()
  start = d.mode == "on" or (d.mode == "auto" and (explicit or (detected or 1) > 1))
  if start:
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


class Watchdog:
  """Exits with one clear line when no step finishes for `timeout_s` seconds in a multi-process run (a lost host
  leaves the others blocked in a collective forever). `beat()` after every step; 0 or one process = off."""

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
        print(f"tinyjax: error: process {jax.process_index()} of {jax.process_count()}: no training step finished "
              f"for {idle:.0f}s (config.distributed.step_timeout_s={self.timeout_s:g}); another process or host is "
              "probably gone; exiting (rerun to resume from the last checkpoint)", file=sys.stderr, flush=True)
        os._exit(EXIT_LOST_HOST)
