"""The training run: setup -> loop -> one end-of-run path. `run(cfg, workdir)` trains cfg to completion, resuming
from the newest checkpoint in workdir; the step itself (state, update, planner) is step.py.

  run      checks, the workdir lock, signals
  _setup   data, the compiled step (refused before allocating if it cannot fit), restore or init
  _loop    steps, logging, evals, checkpoints, preemption; on any stop: status recorded, everything closed
  _finish  the records of a completed run (also for a rerun that finds the run complete)
"""
from __future__ import annotations

import dataclasses
import gc
import hashlib
import os
from typing import Any

import jax
import numpy as np

from tinyjax import config, data, dynamics, errors, evaluate, plan, sharding, step
from tinyjax.runtime import (
  checkpoint,
  distributed,
  faults,
  files,
  health,
  metrics,
  profile,
  record,
  results,
  tracking,
  workdir as workdirs,
)


def params_sha256(params) -> str:
  """Bitwise fingerprint of the parameters (leaf order is the pytree's, which is deterministic)."""
  h = hashlib.sha256()
  for leaf in jax.tree.leaves(jax.device_get(params)):
    h.update(np.ascontiguousarray(leaf).tobytes())
  return h.hexdigest()


def gc_policy(policy: str) -> None:
  """config.env.gc_policy during the loop: "freeze" moves setup objects out of GC's view (fewer, shorter
  collections); "disable" turns the cyclic collector off; "default" restores normal collection."""
  if policy == "default":
    gc.enable()
    gc.unfreeze()
  elif policy == "freeze":
    gc.collect()
    gc.freeze()
  elif policy == "disable":
    gc.disable()


def resolve_cache_dir(cache_dir: str) -> str:
  """A relative data.cache_dir as an absolute path (relative to where the run starts)."""
  return cache_dir if cache_dir.startswith("~") or "://" in cache_dir else os.path.abspath(cache_dir)


def _writable(path: str, what: str) -> None:
  try:
    files.probe_write(os.path.expanduser(path))
  except OSError as e:
    raise config.ConfigError(f"{what}={path!r} is not a writable directory ({e.strerror}); choose another") from e


def _open_workdir(cfg, workdir: str) -> workdirs.Workdir:
  """The run's workdir (gs://...: checkpoints in place, small files mirrored), checked before anything starts."""
  wd = workdirs.Workdir(workdir, cfg.data.cache_dir)
  _writable(wd.local, "--workdir")
  ckpts = os.path.join(wd.local, workdirs.CHECKPOINTS)  # else the first save fails, after training has started
  if os.path.lexists(ckpts) and not os.path.isdir(ckpts):
    raise config.ConfigError(f"{ckpts} is not a directory: move it away (checkpoints are written there)")
  if "://" not in cfg.data.cache_dir:
    _writable(cfg.data.cache_dir, "config.data.cache_dir")  # before any build starts (else a traceback mid-build)
  return wd


def run(cfg, workdir: str, env_record: dict) -> dict:
  """Trains cfg to completion in workdir (resuming if it holds a checkpoint); returns the final metrics row.

  A SIGTERM/SIGINT/SIGHUP (faults.Signals) before the first step raises errors.StoppedInSetup at the next safe
  point of the setup; in the loop, the run checkpoints at the next step boundary and raises errors.Preempted."""
  # Saved resolved (config.json, checkpoints): export and sample find the tokenizer from any directory. "~" stays.
  cfg.data.cache_dir = resolve_cache_dir(cfg.data.cache_dir)
  with faults.handling_signals() as signals:
    signals.stop_point()
    wd = _open_workdir(cfg, workdir)
    lock = workdirs.Lock(wd.local, wd.path, active=jax.process_index() == 0)  # one trainer per workdir (process 0's)
    lock.acquire()
    try:
      wd.pull()
      s = _setup(cfg, wd, env_record, signals)
      if s.start >= s.total:
        s.say(f"run already complete ({s.total} steps) in {wd.path}")
        if s.ckpt:
          s.ckpt.close()
        return _finish(s, s.state, {"step": s.start})  # a stop after the final checkpoint may have left some records
      if s.ckpt:
        s.ckpt.check_space(s.state)  # room for the next checkpoint, before any step (else a refusal mid-run)
      state, last = _loop(s)
      return _finish(s, state, last)
    finally:
      lock.release()


@dataclasses.dataclass
class Setup:
  """What the loop runs on: everything _setup built before the first step."""
  cfg: Any
  wd: workdirs.Workdir
  signals: faults.Signals
  info: dict  # the planned run (plan.describe + the memory plan): run_info.json's head
  built: step.Built
  train_step: Any
  ds: data.Dataset
  ckpt: checkpoint.Checkpointer | None
  state: Any
  meta: dict  # the restored checkpoint's meta ({"step": 0} for a fresh run)

  @property
  def start(self) -> int:
    return self.meta["step"]

  @property
  def total(self) -> int:
    return self.info["num_train_steps"]

  def say(self, message: str) -> None:
    if jax.process_index() == 0:  # process 0 alone talks
      print(message, flush=True)


def _prepare_data(cfg) -> data.Dataset:
  """Several processes: process 0 prepares the data first (one build on shared storage; the others then find the
  finished ledger, or, on per-host local disks, build their own copy after it)."""
  if jax.process_index() != 0:
    distributed.barrier("tinyjax-data-ready")
  ds = data.prepare(cfg)
  if jax.process_index() == 0:
    distributed.barrier("tinyjax-data-ready")
  return ds


def _setup(cfg, wd, env_record: dict, signals: faults.Signals) -> Setup:
  signals.multiprocess = distributed.is_multiprocess()  # from here on a stop is JAX's preemption notice
  signals.stop_point()
  mesh = sharding.make_mesh(cfg.mesh)
  ds = _prepare_data(cfg)
  signals.stop_point()
  built = step.build(cfg, mesh, eos_id=ds.eos_id)
  info = plan.describe(cfg, mesh, env_record)
  # Before anything is allocated: compile the step (shapes only) and refuse one that cannot fit the device.
  train_step, info["memory"] = step.compile_for_device(built, cfg)
  signals.stop_point()
  # Resume order: (1) the newest readable checkpoint in workdir/checkpoints restores the state (onto this mesh) and
  # the data position (= its step); an unreadable newest one falls back to the previous; (2) else a fresh init,
  # from a HF Llama checkpoint with model.init_from.
  ckpt = checkpoint.Checkpointer(wd.local, cfg, wd.checkpoints) if cfg.checkpoint.enabled else None
  restored = ckpt.restore_latest(built.abstract_state()) if ckpt else None
  state, meta = restored if restored else (built.init(), {"step": 0})
  if not restored and cfg.model.init_from:
    from tinyjax import weights  # noqa: PLC0415 - only runs that import weights need it
    state = weights.init_from(cfg, state, built.tx, built.state_sh)
  signals.stop_point()
  s = Setup(cfg, wd, signals, info, built, train_step, ds, ckpt, state, meta)
  if s.start:
    s.say(f"resuming from checkpoint at step {s.start}/{s.total} in {ckpt.directory}")
  return s


def _open_records(s: Setup) -> tuple[metrics.Logger, tracking.Tracker]:
  """config.json (the previous one kept when allowed changes resume it), run_info.json, and the metrics logger with
  its TensorBoard / W&B mirror."""
  cfg, workdir, start = s.cfg, s.wd.local, s.start
  changes = s.ckpt.config_changes if s.ckpt else []
  if jax.process_index() == 0:
    config_json = os.path.join(workdir, workdirs.CONFIG)
    if changes and os.path.exists(config_json):
      os.replace(config_json, os.path.join(workdir, f"config.before-step{start}.json"))
    files.atomic_write(config_json, cfg.to_json_best_effort(indent=2, sort_keys=True))
  s.info = record.start(workdir, cfg, s.info)
  log = metrics.Logger(workdir, s.total, config.tokens_per_step(cfg), cfg.train.log_every, start,
                       s.meta.get("training_time", 0.0))
  if changes:  # allowed by checkpoint.allow_config_change: on the record
    log.event(start, "config_changed", f"resumed with changed {', '.join(changes)} "
                                       f"(previous config: config.before-step{start}.json)")
  tracker = tracking.Tracker(workdir, cfg, start)
  log.sinks.append(tracker)
  return log, tracker


def _dynamics_step(s: Setup):
  """The dynamics variant of the step (train.dynamics_every > 0), compiled now, outside the timed loop, so that
  training_time and throughput exclude it; None when off."""
  if not s.cfg.train.dynamics_every:
    return None
  with jax.set_mesh(s.built.batch_sh.mesh):
    dyn = s.built.make(s.info["memory"]["grad_accum_steps"], with_dynamics=True)
    return dyn.lower(*s.built.abstract_inputs(s.cfg.train.train_batch_size)).compile()


def _loop(s: Setup) -> tuple[Any, dict]:
  """Steps from s.start to s.total; returns (final state, last metrics row). Any stop (preemption, divergence, full
  disk, a bug) is recorded in run_info.json and everything is closed before it propagates."""
  cfg, state, batch_sh, signals = s.cfg, s.state, s.built.batch_sh, s.signals
  log, tracker = _open_records(s)
  guard = Guard(cfg, log, s.ckpt, s.wd)
  evaluator = evaluate.Evaluator(s.built.model, s.ds, cfg, batch_sh)
  every, dyn_step = cfg.train.dynamics_every, _dynamics_step(s)
  dyn_log = dynamics.Log(s.wd.local, s.start, [tracker])
  batches = data.train_batches(s.ds, cfg, s.start, jax.process_index(), jax.process_count())
  prof = profile.Profiler.open(cfg.train.profile_steps, s.wd, s.start)  # None when off
  # The status to record if the loop stops; None once it has completed (_finish records that, and pushes).
  ended: str | None = "failed"
  watchdog = distributed.Watchdog(cfg.distributed.step_timeout_s)  # a lost host must not hang us
  gc_policy(cfg.env.gc_policy)
  try:
    signals.stop_point()  # inside the try: a stop here is recorded in run_info.json ("preempted")
    signals.phase = "loop"  # a signal from here on: checkpoint at the next step boundary
    for n in range(s.start + 1, s.total + 1):  # `n` counts completed updates
      if prof:
        prof.before(n, state)
      if every and n % every == 0:
        state, out = dyn_step(state, sharding.to_global(next(batches), batch_sh))
        dyn_log.push(n, out.pop("dynamics"))  # fetched at the next dynamics step or the end
      else:
        state, out = s.train_step(state, sharding.to_global(next(batches), batch_sh))
      if prof:
        prof.after(n, (state, out))
      guard.check(log.push(n, out))  # fetches the previous log step only: the dispatch queue never stalls
      if n % cfg.train.steps_per_eval == 0 or n == s.total:
        guard.check(log.flush())
        log.write(n, evaluator(state.params, n))
      guard.step_end(n, state, distributed.preempted(n, signals.received), signals.received)  # same step everywhere
      watchdog.beat()
    guard.check(log.flush())
    if s.ckpt:
      s.ckpt.wait()  # the final checkpoint is committed before the run is recorded as completed
    if prof:
      prof.report(s.train_step, s.built.model.cfg, cfg.train.train_batch_size, batch_sh.mesh)
    ended = None
  except Exception as e:
    end = errors.ending(e)
    ended = end.status if end else "failed"
    if ended == "lost_host":  # the cleanup below would wait for the lost process: leave at once
      record.finish(s.wd.local, s.info, ended)
      distributed.leave_lost_host(end.evidence)
    raise
  finally:  # the watchdog stays on through the final checkpoint's close, which also waits on every process
    _close_all([prof.close if prof else None, dyn_log.flush, tracker.close, lambda: setattr(signals, "phase", "done"),
                lambda: gc_policy("default"), s.ckpt.close if s.ckpt else None, watchdog.stop,
                None if ended is None else lambda: record.finish(s.wd.local, s.info, ended),
                None if ended is None else s.wd.push])
  return state, log.last


def _finish(s: Setup, state, last: dict) -> dict:
  """The one end of a completed run, whether it just finished or a rerun found it complete: whatever of its records
  is missing is written (the final param_sha256 row), run_info.json is marked "completed", then speedrun_results.json
  is written from it when missing or written before the run was complete (a stop at the final step writes it with
  status "preempted"), and a remote workdir is pushed."""
  workdir, total = s.wd.local, s.total
  if jax.process_index() == 0:
    rows = metrics.read(workdir)
    if not any("param_sha256" in r for r in rows):
      digest = params_sha256(state.params)
      metrics.append(workdir, {"step": total, "param_sha256": digest})
      print(f"step {total}/{total} | param_sha256 {digest}", flush=True)
    saved = workdirs.read_json(workdir, workdirs.RUN_INFO)
    if not saved or saved.get("status") != "completed":
      record.finish(workdir, saved or record.start(workdir, s.cfg, s.info), "completed")
    written = workdirs.read_json(workdir, workdirs.RESULTS) or {}
    if [r.get("run_info", {}).get("tinyjax", {}).get("status") for r in written.get("runs", [])] != ["completed"]:
      results.write_results(workdir)  # Marin-schema speedrun_results.json (workdir.status: "incomplete" until then)
  s.wd.push()
  return last


def _close_all(steps) -> None:
  """Runs every step (None: skipped) in order, even after one raised: a full disk can fail several of them, and the
  checkpoint's close (which removes a failed save's folder) and run_info.json's status must still be done. Raises
  the first error (chained to the one the loop is stopping on, if any)."""
  first = None
  for fn in steps:
    try:
      if fn is not None:
        fn()
    except Exception as e:  # noqa: BLE001 - re-raised below, after the other steps
      first = first or e
  if first is not None:
    raise first


class Guard:
  """Host side of the non-finite guard, loss-spike warnings, checkpoints and preemption: never lets a diverged run
  write a checkpoint, and stops a preempted one at a checkpointed step boundary."""

  def __init__(self, cfg, log: metrics.Logger, ckpt: checkpoint.Checkpointer | None, wd=None):
    self.skip, self.log, self.ckpt, self.wd = cfg.train.skip_bad_steps, log, ckpt, wd
    self.spikes = health.SpikeDetector(cfg.train.loss_spike_ratio, cfg.train.loss_spike_window)
    self.reported_bad = 0
    self.total = log.total

  def check(self, row: dict | None) -> None:
    if not row:
      return
    diverged = health.divergence(row)
    if diverged and not self.skip:
      last = self.ckpt.last_step if self.ckpt else None
      saved = f"last good checkpoint: step {last}" if last is not None else "no checkpoint had been written yet"
      self.log.event(row["step"], "diverged", f"{diverged}; {saved}")
      raise errors.Diverged(f"{diverged}; the update was not applied and nothing non-finite was saved; {saved}")
    if row.get("bad_steps", 0) > self.reported_bad:
      self.log.event(row["step"], "skipped_bad_steps", f"{diverged}; {int(row['bad_steps'])} updates skipped so far")
      self.reported_bad = row["bad_steps"]
    spike = self.spikes(row["loss"]) if "loss" in row else None
    if spike:
      self.log.event(row["step"], "loss_spike", spike)

  def step_end(self, n: int, state, stop: bool, received: str | None) -> None:
    """After step n: a checkpoint when due (or stopping); a stop raises Preempted once the checkpoint is committed
    and the step's own row is logged, as an uninterrupted run would log it."""
    if self.ckpt and (self.ckpt.due(n, self.total) or stop):
      self.save(n, state)
    if not stop:
      return
    if self.ckpt:
      self.ckpt.wait()  # committed before the message says so
    self.check(self.log.flush())
    why = received or "SIGTERM (a preemption notice to one of the run's processes)"
    self.log.event(n, "preempted", f"{why}: checkpoint at step {n} written")
    raise errors.Preempted(f"stopped by {why} at step {n}; checkpoint written, rerun to resume")

  def save(self, n: int, state) -> None:
    if not self.skip:  # a save is rare: read the guard's counters now rather than checkpoint a skipped step
      first_bad, what = jax.device_get((state.first_bad_step, state.bad_what))
      self.check({"step": n, "first_bad_step": int(first_bad), "bad_what": int(what)})
    self.ckpt.save(n, state, {"training_time": self.log.training_time})
    if self.wd is not None:
      self.wd.push()  # a remote workdir's metrics are at least as new as its newest checkpoint
