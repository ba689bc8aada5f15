"""Orbax checkpoints in workdir/checkpoints: save policy, auto-resume, fallback past unreadable checkpoints.

A checkpoint holds the TrainState (params, optimizer state, step, bad-step counters) and JSON metadata: the config
it was made with, the data position and the summed training time. The data order is a pure function of
(data_seed, step), so the Grain position is the step (as Levanter's iter_from_step); there is no other RNG in the
step. Orbax writes into `<step>.orbax-checkpoint-tmp` and renames when complete, so a kill mid-save leaves no
checkpoint that `all_steps()` would return.
"""
from __future__ import annotations

import json
import os
import time

import jax
import orbax.checkpoint as ocp

from tinyjax.config import EXECUTION_ONLY_MODEL_KEYS, ConfigError


def _flat(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


class Checkpointer:

  def __init__(self, workdir: str, cfg, directory: str | None = None):
    self.cfg, k = cfg, cfg.checkpoint
    # directory: <workdir>/checkpoints, or a remote one (gs://...) for a remote workdir (workdir.py)
    self.directory = directory or os.path.join(os.path.abspath(workdir), "checkpoints")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=k.max_to_keep, keep_period=k.keep_period or None, enable_async_checkpointing=k.async_save,
        cleanup_tmp_directories=True, create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options)
    self.last_save_time = time.monotonic()
    self.last_step = self.manager.latest_step()

  def due(self, step: int, total: int) -> bool:
    k = self.cfg.checkpoint
    by_steps = k.save_interval_steps > 0 and step % k.save_interval_steps == 0
    by_time = k.save_interval_minutes > 0 and time.monotonic() - self.last_save_time >= 60 * k.save_interval_minutes
    return step == total or by_steps or by_time

  def save(self, step: int, state, meta: dict) -> None:
    meta = {"step": step, "config": json.loads(self.cfg.to_json_best_effort()), **meta}
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
                      force=True)
    self.last_save_time, self.last_step = time.monotonic(), step

  def _check_config(self, saved: dict, step: int) -> None:
    """A checkpoint of a different model is a user mistake: name every differing model field."""
    ours, theirs = _flat(json.loads(self.cfg.to_json_best_effort())["model"]), _flat(saved.get("model", {}))
    diff = [f"model.{k} (checkpoint {theirs.get(k)!r}, config {ours.get(k)!r})"
            for k in sorted(set(ours) | set(theirs))
            if ours.get(k) != theirs.get(k) and k not in EXECUTION_ONLY_MODEL_KEYS]
    if diff:
      raise ConfigError(f"checkpoint {self.directory}/{step} was made with a different model: {'; '.join(diff)}")

  def restore_latest(self, abstract_state):
    """(state, meta) from the newest readable checkpoint (onto abstract_state's shardings), or None if none.

    An unreadable newest checkpoint (truncated, corrupted) is skipped with a warning and the previous one is used.
    """
    for step in sorted(self.manager.all_steps(), reverse=True):
      meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
      self._check_config(meta.get("config", {}), step)
      try:
        restored = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
      except Exception as e:  # noqa: BLE001 - Orbax/tensorstore raise many types for damaged files
        print(f"warning: checkpoint {self.directory}/{step} is unreadable ({type(e).__name__}: "
              f"{str(e).splitlines()[0][:200]}); falling back to the previous one", flush=True)
        continue
      self.last_step = step
      return restored.state, meta
    return None

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def abstract(state_shapes, shardings):
  """ShapeDtypeStructs carrying the target shardings: restore lands directly on the current mesh."""
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), state_shapes, shardings)
