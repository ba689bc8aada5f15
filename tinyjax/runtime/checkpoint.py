"""Orbax checkpoints in workdir/checkpoints: save policy, auto-resume, fallback past unreadable checkpoints.

A checkpoint holds the TrainState (params, optimizer state, step, bad-step counters) and JSON metadata: the config
it was made with, the data position and the summed training time. The data order is a pure function of
(data_seed, step), so the Grain position is the step (as Levanter's iter_from_step); there is no other RNG in the
step. Orbax writes into `<step>.orbax-checkpoint-tmp` and renames when complete, so a kill mid-save leaves no
checkpoint that `all_steps()` would return. Orbax deletes a checkpoint it drops (checkpoint.max_to_keep) file by file;
a kill in the middle left a numbered folder half deleted (e.g. `30/state` only) that no later run removed. So a
dropped checkpoint is renamed into `checkpoints/deleting/` first (Orbax's todelete_subdir: one atomic rename) and
removed from there; a run also removes numbered folders older than the checkpoint it resumes from (or its final one)
that are not complete checkpoints (left by a kill during an earlier Orbax's deletion).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import threading
import time

import jax
import orbax.checkpoint as ocp

from tinyjax import errors
from tinyjax.config import EXECUTION_ONLY_MODEL_KEYS, ConfigError
from tinyjax.runtime import faults, workdir as workdirs

# What a resumed run may not change silently (it changes the trajectory): optimizer, budget, batch, data order.
TRAINING_KEY_PREFIXES = ("seed", "optimizer.", "train.train_batch_size", "train.num_train_steps",
                         "train.chinchilla_multiple", "train.nominal_params", "train.grad_accum_steps",
                         "train.z_loss_weight", "train.data_seed", "data.train_urls", "data.tokenizer", "data.text_key")


DELETING = "deleting"  # checkpoints/deleting/: the checkpoints Orbax dropped, renamed there whole, then removed


def _flat(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


class DiskSpace:
  """Full disks around a checkpoint directory. A save is refused before it starts when the space is visibly missing
  (the newest checkpoint's size, or the state's bytes before the first, against the free space), else Orbax's error
  is turned into one line by the Checkpointer. Either way the unfinished `<step>.orbax-checkpoint-tmp` is removed and
  older checkpoints are untouched."""

  def __init__(self, directory: str):
    self.directory, self.remote = directory, "://" in directory

  def needed(self, committed: int | None, state) -> int:
    """Bytes a next checkpoint needs: 10% above the newest one on disk, or the state's raw bytes before the first."""
    newest = os.path.join(self.directory, str(committed)) if committed is not None else None
    if newest and os.path.isdir(newest):
      on_disk = sum(os.path.getsize(os.path.join(root, n)) for root, _, names in os.walk(newest) for n in names)
      return int(on_disk * 1.1) + (1 << 20)
    return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(state)) + (1 << 20)

  def free(self) -> int | None:
    if self.remote or jax.process_count() > 1:  # remote, or several writers: Orbax's errors only
      return None
    os.makedirs(self.directory, exist_ok=True)
    return shutil.disk_usage(self.directory).free

  def shortfall(self, committed: int | None, state) -> tuple[str, str] | None:
    """(needed, free) as text when the next checkpoint visibly does not fit, else None."""
    free, needed = self.free(), self.needed(committed, state)
    return (_mb(needed), _mb(free)) if free is not None and free < needed else None

  @staticmethod
  def after_full(committed: int | None) -> str:
    if committed is None:
      return "no checkpoint had been written yet: free space and rerun to start again"
    return (f"the last complete checkpoint, step {committed}, is intact: free space (or lower "
            "checkpoint.max_to_keep) and rerun to resume from it")

  def discard_unfinished(self, step: int) -> None:
    """Removes a failed save's tmp folder. Orbax's writer threads (and the pool threads they use) outlive the failure
    they report and were measured to refill a folder removed at once: join Orbax's threads, then remove until the
    folder has stayed away for 0.5 s (10 s cap)."""
    deadline = time.monotonic() + 10
    for t in threading.enumerate():
      if t is not threading.current_thread() and type(t).__module__.startswith("orbax"):
        with contextlib.suppress(Exception):  # Orbax's threads re-raise their failure (this one) from join()
          t.join(max(0.0, deadline - time.monotonic()))
    if jax.process_index() != 0 or self.remote:
      return
    path, gone_since = os.path.join(self.directory, f"{step}.orbax-checkpoint-tmp"), None
    while time.monotonic() < deadline:
      if os.path.exists(path):
        shutil.rmtree(path, ignore_errors=True)
        gone_since = None
      elif gone_since is None:
        gone_since = time.monotonic()
      elif time.monotonic() - gone_since >= 0.5:
        return
      time.sleep(0.05)


class Checkpointer:

  def __init__(self, workdir: str, cfg, directory: str | None = None):
    self.cfg, k = cfg, cfg.checkpoint
    # directory: <workdir>/checkpoints, or a remote one (gs://...) for a remote workdir (workdir.py)
    self.directory = directory or os.path.join(os.path.abspath(workdir), workdirs.CHECKPOINTS)
    self.space = DiskSpace(self.directory)
    self.remote = self.space.remote
    options = ocp.CheckpointManagerOptions(
        max_to_keep=k.max_to_keep, keep_period=k.keep_period or None, enable_async_checkpointing=k.async_save,
        cleanup_tmp_directories=True, create=True, todelete_subdir=None if self.remote else DELETING)
    self._remove_deleted()  # before the manager: a leftover would block Orbax's rename of the same step
    self.manager = ocp.CheckpointManager(self.directory, options=options)
    self.last_save_time = time.monotonic()
    self.last_step = self.manager.latest_step()
    self.committed = self.last_step  # the newest checkpoint known complete on disk (async saves commit later)
    self.pending: int | None = None  # the step an async save is still writing
    self.config_changes: list[str] = []  # training keys changed on resume (with checkpoint.allow_config_change)

  def due(self, step: int, total: int) -> bool:
    k = self.cfg.checkpoint
    by_steps = k.save_interval_steps > 0 and step % k.save_interval_steps == 0
    by_time = k.save_interval_minutes > 0 and time.monotonic() - self.last_save_time >= 60 * k.save_interval_minutes
    return step == total or by_steps or by_time

  def save(self, step: int, state, meta: dict) -> None:
    """Saves `step` (asynchronously unless checkpoint.async_save=False); a full disk is errors.DiskFull."""
    self.wait()
    self._check_space(step, state)
    meta = {"step": step, "config": json.loads(self.cfg.to_json_best_effort()), **meta}
    with self._disk_full_is_one_line(step):
      self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                      meta=ocp.args.JsonSave(meta)), force=True)
    self.pending, self.last_save_time, self.last_step = step, time.monotonic(), step

  def check_space(self, state) -> None:
    """Before training: a workdir without room for one checkpoint of this state is a ConfigError."""
    if short := self.space.shortfall(self.committed, state):
      raise ConfigError(f"{self.directory} has {short[1]} free but a checkpoint of this run needs about "
                        f"{short[0]}: free space or choose another --workdir")

  def _check_space(self, step: int, state) -> None:
    if short := self.space.shortfall(self.committed, state):
      raise errors.DiskFull(f"disk full: checkpoint step {step} needs about {short[0]} and {self.directory} has "
                            f"{short[1]} free; {self.space.after_full(self.committed)}")

  @contextlib.contextmanager
  def _disk_full_is_one_line(self, step: int | None):
    try:
      yield
    except Exception as e:  # noqa: BLE001 - Orbax/tensorstore wrap ENOSPC in several types
      reason = errors.disk_full_reason(e)
      if reason is None or step is None:
        raise
      with contextlib.suppress(Exception):  # Orbax keeps the error for a later call: it is reported here, once
        self.manager.check_for_errors()
      self.space.discard_unfinished(step)
      self.pending = None
      raise errors.DiskFull(f"disk full: checkpoint step {step} could not be written to {self.directory} ({reason}); "
                            f"{self.space.after_full(self.committed)}") from e

  def _check_config(self, saved: dict, step: int) -> None:
    """A checkpoint of a different model is a user mistake: name every differing model field."""
    ours, theirs = _flat(json.loads(self.cfg.to_json_best_effort())["model"]), _flat(saved.get("model", {}))
    diff = [f"model.{k} (checkpoint {theirs.get(k)!r}, config {ours.get(k)!r})"
            for k in sorted(set(ours) | set(theirs))
            if ours.get(k) != theirs.get(k) and k not in EXECUTION_ONLY_MODEL_KEYS]
    if diff:
      raise ConfigError(f"checkpoint {self.directory}/{step} was made with a different model: {'; '.join(diff)}")
    ours, theirs = _flat(json.loads(self.cfg.to_json_best_effort())), _flat(saved)
    changed = [k for k in sorted(set(ours) | set(theirs))
               if k.startswith(TRAINING_KEY_PREFIXES) and ours.get(k) != theirs.get(k)]
    if changed and not self.cfg.checkpoint.allow_config_change:
      listed = "; ".join(f"{k} (checkpoint {theirs.get(k)!r}, config {ours.get(k)!r})" for k in changed)
      raise ConfigError(f"resuming {self.directory}/{step} with a changed training config: {listed}; rerun with the "
                        "checkpoint's values, or set config.checkpoint.allow_config_change=True to continue anyway "
                        "(recorded in metrics.jsonl; the old config.json is kept)")
    self.config_changes = changed

  def restore_latest(self, abstract_state):
    """(state, meta) from the newest readable checkpoint (onto abstract_state's shardings), or None if there is none.

    Resume order: newest step first. A step that cannot be read (damaged files, missing or garbage meta, an empty or
    stray numbered folder) is skipped; once an older step restores, the unreadable newer ones are moved aside to
    `<step>.corrupt-<time>` (kept for inspection; saving that step again would otherwise fail). If checkpoints exist
    but none can be restored, that is a ConfigError naming why (e.g. a changed optimizer), and nothing is moved or
    deleted, unless checkpoint.start_over is set: then they are moved aside and the run starts from step 0.
    """
    failed = []
    for step in sorted(self._candidate_steps(), reverse=True):
      faults.stop_point()  # a stop signal never raises inside the try below (it would call this step unreadable)
      try:
        meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        if not isinstance(meta, dict) or "config" not in meta:
          raise ValueError("its meta/ is missing or not tinyjax's")
        self._check_config(meta.get("config", {}), step)
        restored = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
      except ConfigError:
        raise
      except Exception as e:  # noqa: BLE001 - Orbax/tensorstore raise many types for damaged files
        if errors.peer_lost(e):  # another process is gone, not this checkpoint: exit 4 (cli.stop)
          raise
        failed.append((step, f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"))
        print(f"warning: checkpoint {self.directory}/{step} is unreadable ({failed[-1][1]}); trying the previous one",
              flush=True)
        continue
      self._move_aside([s for s, _ in failed])
      self._remove_incomplete(below=step)
      self.last_step = self.committed = step
      return restored.state, meta
    if failed and not self.cfg.checkpoint.start_over:
      step, why = failed[0]
      raise ConfigError(f"{self.directory} holds checkpoints {[s for s, _ in failed]} and none can be restored "
                        f"(newest, step {step}: {why}); fix the config to match them, or set "
                        "config.checkpoint.start_over=True to move them aside and start from step 0")
    self._move_aside([s for s, _ in failed])
    self.last_step = self.committed = None
    return None

  def _candidate_steps(self) -> list[int]:
    """Orbax's finished steps plus numbered folders it does not list (stray or empty ones)."""
    steps = set(self.manager.all_steps())
    if os.path.isdir(self.directory):
      steps |= {int(n) for n in os.listdir(self.directory) if n.isdigit()}
    return sorted(steps)

  def _remove_deleted(self) -> None:
    """Removes checkpoints/deleting/ (process 0; never while a save, and so Orbax's renames into it, is in flight)."""
    if jax.process_index() == 0 and not self.remote:
      shutil.rmtree(os.path.join(self.directory, DELETING), ignore_errors=True)

  def _remove_incomplete(self, below: int | None) -> None:
    """Removes numbered folders older than `below` (a complete checkpoint) that are not complete checkpoints: what a
    kill during Orbax's file-by-file deletion left. Unreadable folders newer than it are moved aside instead."""
    if below is None or jax.process_index() != 0 or self.remote or not os.path.isdir(self.directory):
      return
    removed = []
    for name in os.listdir(self.directory):
      path = os.path.join(self.directory, name)
      if name.isdigit() and int(name) < below and os.path.isdir(path) and not workdirs.complete_checkpoint(path):
        shutil.rmtree(path, ignore_errors=True)
        removed.append(int(name))
    if removed:
      print(f"removed the incomplete (half-deleted) checkpoint folder(s) {sorted(removed)} in {self.directory}",
            flush=True)
      self.manager.reload()

  def _move_aside(self, steps: list[int]) -> None:
    if not steps or jax.process_index() != 0 or self.remote:
      return
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for step in steps:
      src = os.path.join(self.directory, str(step))
      if os.path.exists(src):
        os.replace(src, f"{src}.corrupt-{stamp}")
        print(f"warning: moved the unreadable checkpoint {src} aside to {src}.corrupt-{stamp}", flush=True)
    self.manager.reload()

  def wait(self) -> None:
    """Blocks until the pending save is committed (a full disk raises errors.DiskFull)."""
    with self._disk_full_is_one_line(self.pending):
      self.manager.wait_until_finished()
      # A failed background commit is not always raised by the wait: Orbax's finalize step logs it and returns, and
      # it was measured to surface only in manager.close(), after the step had been counted as committed.
      self.manager.check_for_errors()
    if self.pending is not None:
      self.committed, self.pending = self.pending, None
    self._remove_deleted()

  def close(self) -> None:
    self.wait()
    self._remove_incomplete(below=self.committed)
    self._keep_only_retained()
    self.manager.close()

  def _keep_only_retained(self) -> None:
    """Drops what Orbax would have dropped after the newest save, had the run not been killed between that save's
    commit and its deletions (a finished run saves no more, so nothing else would): max_to_keep newest, plus every
    keep_period-th. Every process calls it (Orbax's delete holds a barrier); its list of steps is Orbax's own."""
    k, steps = self.cfg.checkpoint, sorted(self.manager.all_steps())
    for step in steps[:-k.max_to_keep]:
      if not (k.keep_period and step % k.keep_period == 0):
        self.manager.delete(step)
    self._remove_deleted()


def _mb(n: int) -> str:
  return f"{n / 1e6:,.1f} MB"
