"""Train state, the jitted train step (gradient accumulation, non-finite guard), and the loop `run(cfg, workdir)`."""
from __future__ import annotations

import gc
import hashlib
import json
import os
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from tinyjax import config, data, dynamics, evaluate, optim, plan, sharding
from tinyjax.hardware import memory
from tinyjax.model import ModelConfig, Transformer, next_token_loss
from tinyjax.runtime import (
  checkpoint,
  distributed,
  faults,
  files,
  metrics,
  record,
  results,
  tracking,
  workdir as workdirs,
)


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array
  params: Any
  opt_state: Any
  bad_steps: jax.Array  # updates skipped because the loss or gradient norm was not finite
  first_bad_step: jax.Array  # step of the first non-finite update, -1 if none
  bad_what: jax.Array  # what was non-finite at first_bad_step: bits 1 loss, 2 grad_norm, 4 updated params


def init_state(model: Transformer, tx: optax.GradientTransformation, seed: int) -> TrainState:
  tokens_BL = jnp.zeros((1, model.cfg.seq_len), jnp.int32)
  params = model.init(jax.random.key(seed), tokens_BL)["params"]
  zero = jnp.zeros((), jnp.int32)
  return TrainState(step=zero, params=params, opt_state=tx.init(params), bad_steps=zero, first_bad_step=zero - 1,
                    bad_what=zero)


def loss_fn(model: Transformer, z_loss_weight: float):
  """params, tokens[B, L] -> (loss incl. z-loss, (mean NLL in nats/token)); blockwise: no [B, L, V] logits."""
  return lambda params, tokens_BL: next_token_loss(model, params, tokens_BL, z_loss_weight)


def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def make_train_step(model, tx, cfg, total_steps: int, state_shardings, batch_sharding, accum: int | None = None,
                    with_dynamics: bool = False):
  """(state, tokens[B, L]) -> (state, metrics), jitted with explicit shardings and the state donated.

  A non-finite loss or gradient norm never reaches the state: the update is dropped (params and optimizer state
  keep their values) and counted; the host decides whether that stops the run (default) or is skipped (Marin's
  skip_bad_steps). So every state the loop can checkpoint is finite.
  with_dynamics: the same update, plus metrics["dynamics"] (dynamics.py): a separate function that run() compiles
  ahead and calls only on dynamics steps, so ordinary steps pay nothing.
  """
  grad_fn = jax.value_and_grad(loss_fn(model, cfg.train.z_loss_weight), has_aux=True)
  accum = accum or cfg.train.grad_accum_steps  # the memory plan resolves grad_accum_steps=0 (auto)
  micro_sharding = NamedSharding(batch_sharding.mesh, P(None, sharding.DATA))

  def grads_and_loss(params, tokens_BL):
    if accum == 1:
      (_, loss), grads = grad_fn(params, tokens_BL)
      return grads, loss
    B, L = tokens_BL.shape
    # Microbatch a takes rows a, a+accum, ...: every device keeps its own rows (no resharding of the batch).
    tokens_ABL = jax.lax.with_sharding_constraint(
        tokens_BL.reshape(B // accum, accum, L).transpose(1, 0, 2), micro_sharding)

    def body(carry, micro_BL):
      (_, loss), grads = grad_fn(params, micro_BL)
      return jax.tree.map(jnp.add, carry, (grads, loss)), None
    zeros = (jax.tree.map(jnp.zeros_like, params), jnp.zeros((), jnp.float32))
    (grads, loss), _ = jax.lax.scan(body, zeros, tokens_ABL)
    # Every microbatch has the same number of loss positions, so the mean of means is the full-batch mean.
    return jax.tree.map(lambda g: g / accum, grads), loss / accum

  def step(state: TrainState, tokens_BL):
    grads, loss = grads_and_loss(state.params, tokens_BL)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    candidate = optax.apply_updates(state.params, updates)
    candidate_norm = optax.tree.norm(candidate)  # an update can overflow with finite grads (e.g. a huge LR)
    state_ok = jnp.isfinite(candidate_norm) & _all_finite(opt_state)  # nothing non-finite may reach a checkpoint
    what = jnp.where(jnp.isfinite(loss), 0, 1) + jnp.where(jnp.isfinite(grad_norm), 0, 2)
    what = what + jnp.where(state_ok | (what > 0), 0, 4)  # 4: only the update itself went non-finite
    bad = what > 0
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(bad, o, n), new, old)
    first = bad & (state.first_bad_step < 0)
    new = TrainState(
        step=state.step + 1, params=keep(candidate, state.params),
        opt_state=keep(opt_state, state.opt_state), bad_steps=state.bad_steps + bad.astype(jnp.int32),
        first_bad_step=jnp.where(first, state.step + 1, state.first_bad_step),
        bad_what=jnp.where(first, what, state.bad_what))
    param_norm = jnp.where(bad, optax.tree.norm(state.params), candidate_norm)
    out = {"loss": loss, "grad_norm": grad_norm, "param_norm": param_norm,
           "bad_steps": new.bad_steps, "first_bad_step": new.first_bad_step, "bad_what": new.bad_what,
           **optim.current_learning_rates(cfg, total_steps, state.step)}
    if with_dynamics:
      out["dynamics"] = dynamics.collect(model, state.params, grads, updates, tokens_BL[:cfg.train.dynamics_rows])
    return new, out

  return jax.jit(step, in_shardings=(state_shardings, batch_sharding), out_shardings=(state_shardings, None),
                 donate_argnums=0)


def step_inputs(cfg, shapes, state_sh, batch_sh, batch: int | None = None):
  """(state, tokens) ShapeDtypeStructs carrying their shardings: what the step is lowered and compiled for."""
  return (checkpoint.abstract(shapes, state_sh),
          memory.abstract_batch(batch or cfg.train.train_batch_size, cfg.model.seq_len, batch_sh))


def compile_step(cfg, model, tx, total: int, shapes, state_sh, batch_sh):
  """(train step, memory plan). With train.memory_check (or grad_accum_steps=0, auto) the step is compiled ahead
  for these shapes and XLA's figures are checked against the device; a step that cannot fit is a ConfigError."""
  mesh = batch_sh.mesh
  if not cfg.train.memory_check and cfg.train.grad_accum_steps:
    return make_train_step(model, tx, cfg, total, state_sh, batch_sh), {"checked": False}
  device = mesh.devices.flat[0]
  per_device = cfg.train.train_batch_size // mesh.shape[sharding.DATA]
  abstract = step_inputs(cfg, shapes, state_sh, batch_sh)
  planner = memory.StepPlanner(
      cfg, lambda a: make_train_step(model, tx, cfg, total, state_sh, batch_sh, accum=a), abstract, per_device)
  accum, info, fit = planner.choose(memory.device_memory(device.device_kind, cfg.train.device_memory_gb),
                                    device.platform)
  if cfg.train.memory_check and fit["fits"] is False:
    memory.refuse(cfg, info["peak"], fit, device.device_kind, accum)
  plan_info = {"checked": cfg.train.memory_check, "grad_accum_steps": accum, "compiled_gib": memory.gib(info),
               "attention": model.cfg.attention_impl(device.platform), **fit}
  return planner.executables[accum], plan_info


def finish_records(workdir: str, cfg, info: dict, state: TrainState, total: int) -> None:
  """Writes whatever end-of-run record a completed run lacks: the final param_sha256 row, run_info.json's
  "completed" status and speedrun_results.json (process 0)."""
  if jax.process_index() != 0:
    return
  rows = metrics.read(workdir)
  if not any("param_sha256" in r for r in rows):
    with open(os.path.join(workdir, metrics.FILE), "a") as f:
      f.write(json.dumps({"step": total, "param_sha256": params_sha256(state.params)}, sort_keys=True) + "\n")
    print(f"wrote the missing final param_sha256 to {metrics.FILE}", flush=True)
  path = os.path.join(workdir, "run_info.json")
  saved = None
  if os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
  if not saved or saved.get("status") != "completed":
    record.finish(workdir, saved or record.start(workdir, cfg, info), "completed")
    print("marked run_info.json completed", flush=True)
  if not os.path.exists(os.path.join(workdir, results.RESULTS_FILE)):
    results.write_results(workdir)
    print(f"wrote the missing {results.RESULTS_FILE}", flush=True)


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


def _check_writable(workdir: str) -> None:
  try:
    files.probe_write(workdir)
  except OSError as e:
    raise config.ConfigError(f"--workdir={workdir} is not writable ({e.strerror}); choose another directory") from e
  ckpts = os.path.join(workdir, "checkpoints")  # else the first save fails, after training has started
  if os.path.lexists(ckpts) and not os.path.isdir(ckpts):
    raise config.ConfigError(f"{ckpts} is not a directory: move it away (checkpoints are written there)")


def resolve_cache_dir(cache_dir: str) -> str:
  """A relative data.cache_dir as an absolute path (relative to where the run starts)."""
  return cache_dir if cache_dir.startswith("~") or "://" in cache_dir else os.path.abspath(cache_dir)


def _check_cache_dir(cache_dir: str) -> None:
  """data.cache_dir must be a writable directory before any build starts (else a traceback mid-build)."""
  path = os.path.expanduser(cache_dir)
  if "://" in path:
    return
  try:
    files.probe_write(path)
  except OSError as e:
    raise config.ConfigError(f"config.data.cache_dir={cache_dir!r} is not a writable directory ({e.strerror}); "
                             "choose another directory") from e


def run(cfg, workdir: str, env_record: dict) -> dict:
  """Trains cfg to completion in workdir (resuming if it holds a checkpoint); returns the final metrics row.

  A SIGTERM/SIGINT/SIGHUP (faults.Signals) before the first step raises faults.StoppedInSetup at the next safe
  point of the setup; in the loop, the run checkpoints at the next step boundary and raises faults.Preempted."""
  # Saved resolved (config.json, checkpoints): export and sample find the tokenizer from any directory. "~" stays.
  cfg.data.cache_dir = resolve_cache_dir(cfg.data.cache_dir)
  with faults.handling_signals() as signals:
    signals.stop_point()
    wd = workdirs.Workdir(workdir, cfg.data.cache_dir)  # gs://...: checkpoints in place, small files mirrored
    _check_writable(wd.local)
    _check_cache_dir(cfg.data.cache_dir)
    lock = workdirs.Lock(wd.local, wd.path, active=jax.process_index() == 0)  # one trainer per workdir (process 0's)
    lock.acquire()
    try:
      wd.pull()
      return _train(cfg, wd, env_record, signals)
    finally:
      lock.release()


def _train(cfg, wd, env_record: dict, signals: faults.Signals) -> dict:
  workdir = wd.local
  signals.multiprocess = distributed.is_multiprocess()  # from here on a stop is JAX's preemption notice
  signals.stop_point()
  mesh = sharding.make_mesh(cfg.mesh)
  # Several processes: process 0 prepares the data first (one build on shared storage; the others then find the
  # finished ledger, or, on per-host local disks, build their own copy after it).
  if jax.process_index() != 0:
    distributed.barrier("tinyjax-data-ready")
  ds = data.prepare(cfg)
  if jax.process_index() == 0:
    distributed.barrier("tinyjax-data-ready")
  signals.stop_point()
  model = Transformer(ModelConfig.from_config(cfg.model), eos_id=ds.eos_id)
  info = plan.describe(cfg, mesh, env_record)
  total = info["num_train_steps"]
  tx = optim.make(cfg, total)
  init = lambda: init_state(model, tx, cfg.seed)
  shapes = jax.eval_shape(init)
  state_sh = sharding.state_shardings(shapes, mesh, cfg.mesh.fsdp)
  batch_sh = sharding.batch_sharding(mesh)
  # Before anything is allocated: compile the step (shapes only) and refuse one that cannot fit the device.
  train_step, info["memory"] = compile_step(cfg, model, tx, total, shapes, state_sh, batch_sh)
  signals.stop_point()

  # Resume order: (1) the newest readable checkpoint in workdir/checkpoints restores the state (onto this mesh) and
  # the data position (= its step); an unreadable newest one falls back to the previous; (2) else a fresh init.
  ckpt = checkpoint.Checkpointer(workdir, cfg, wd.checkpoints) if cfg.checkpoint.enabled else None
  restored = ckpt.restore_latest(checkpoint.abstract(shapes, state_sh)) if ckpt else None
  state, meta = restored if restored else (jax.jit(init, out_shardings=state_sh)(), {"step": 0})
  if not restored and cfg.model.init_from:  # a fresh run may start from a HF Llama checkpoint
    from tinyjax import export  # noqa: PLC0415 - only runs that import weights need it
    state = export.init_from(cfg, state, tx, state_sh)
  signals.stop_point()
  start = meta["step"]
  say = print if jax.process_index() == 0 else (lambda *a, **k: None)  # process 0 alone talks
  if start:
    say(f"resuming from checkpoint at step {start}/{total} in {ckpt.directory}", flush=True)
  if start >= total:
    say(f"run already complete ({total} steps) in {wd.path}", flush=True)
    ckpt.close()
    finish_records(workdir, cfg, info, state, total)  # a stop after the final checkpoint left some unwritten
    wd.push()
    return {"step": start}
  if ckpt:
    ckpt.check_space(shapes)  # room for the next checkpoint, before any step (else a refusal mid-run)
  if jax.process_index() == 0:
    if ckpt and ckpt.config_changes and os.path.exists(os.path.join(workdir, "config.json")):
      os.replace(os.path.join(workdir, "config.json"), os.path.join(workdir, f"config.before-step{start}.json"))
    files.atomic_write(os.path.join(workdir, "config.json"), cfg.to_json_best_effort(indent=2, sort_keys=True))
  info = record.start(workdir, cfg, info)

  evaluator = evaluate.Evaluator(model, ds, cfg, batch_sh)
  log = metrics.Logger(workdir, total, config.tokens_per_step(cfg), cfg.train.log_every, start,
                       meta.get("training_time", 0.0))
  guard = Guard(cfg, log, ckpt, wd)
  if ckpt and ckpt.config_changes:  # allowed by checkpoint.allow_config_change: on the record
    log.event(start, "config_changed", f"resumed with changed {', '.join(ckpt.config_changes)} "
                                       f"(previous config: config.before-step{start}.json)")
  tracker = tracking.Tracker(workdir, cfg, start)  # TensorBoard / W&B mirrors of metrics and dynamics
  log.sinks.append(tracker)
  every = cfg.train.dynamics_every
  dyn_log = dynamics.Log(workdir, start, [tracker])
  dyn_step = None
  if every:  # compiled now, outside the timed loop, so that training_time and throughput exclude it
    dyn = make_train_step(model, tx, cfg, total, state_sh, batch_sh, info["memory"].get("grad_accum_steps"),
                          with_dynamics=True)
    with jax.set_mesh(mesh):
      dyn_step = dyn.lower(*step_inputs(cfg, shapes, state_sh, batch_sh)).compile()
  batches = data.train_batches(ds, cfg, start, jax.process_index(), jax.process_count())
  status = "failed"
  watchdog = distributed.Watchdog(cfg.distributed.step_timeout_s)  # a lost host must not hang the others forever
  gc_policy(cfg.env.gc_policy)
  try:
    signals.stop_point()  # inside the try: a stop here is recorded in run_info.json ("preempted")
    signals.phase = "loop"  # a signal from here on: checkpoint at the next step boundary
    for step in range(start + 1, total + 1):  # `step` counts completed updates
      if every and step % every == 0:
        state, out = dyn_step(state, sharding.to_global(next(batches), batch_sh))
        dyn_log.push(step, out.pop("dynamics"))  # fetched at the next dynamics step or the end
      else:
        state, out = train_step(state, sharding.to_global(next(batches), batch_sh))
      guard.check(log.push(step, out))  # fetches the previous log step only: the dispatch queue never stalls
      if step % cfg.train.steps_per_eval == 0 or step == total:
        guard.check(log.flush())
        log.write(step, evaluator(state.params, step))
      stop = distributed.preempted(step, signals.received)  # several processes: the same step on every one
      if ckpt and (ckpt.due(step, total) or stop):
        guard.save(step, state)
      if stop:
        if ckpt:
          ckpt.wait()  # committed before the message says so
        guard.check(log.flush())  # the preempted step's own row, as an uninterrupted run would log it
        why = signals.received or "SIGTERM (a preemption notice to one of the run's processes)"
        log.event(step, "preempted", f"{why}: checkpoint at step {step} written")
        raise faults.Preempted(f"stopped by {why} at step {step}; checkpoint written, rerun to resume")
      watchdog.beat()
    guard.check(log.flush())
    if ckpt:
      ckpt.wait()  # the final checkpoint is committed before the run is recorded as completed
    status = "completed"
  except Exception as e:
    status = faults.status(e)
    if lost := distributed.peer_lost(e):  # the cleanup below would wait for the lost process: leave at once
      record.finish(workdir, info, "lost_host")
      distributed.leave_lost_host(f"a collective or checkpoint call failed ({lost})")
    raise
  finally:  # the watchdog stays on through the final checkpoint's close, which also waits on every process
    _close_all([dyn_log.flush, tracker.close, lambda: setattr(signals, "phase", "done"),
                lambda: gc_policy("default"), ckpt.close if ckpt else None, watchdog.stop,
                lambda: record.finish(workdir, info, status), wd.push])
  log.write(total, {"param_sha256": params_sha256(state.params)})
  if jax.process_index() == 0:
    results.write_results(workdir)  # Marin-schema speedrun_results.json
  wd.push()
  return log.last


def _close_all(steps) -> None:
  """Runs every step (None: skipped) in order, even after one raised: a full disk can fail several of them, and the
  checkpoint's close (which removes a failed save's folder) and run_info.json's status must still be done. Raises
  the first error (chained to the one the loop is stopping on, if any)."""
  first = None
  for step in steps:
    try:
      if step is not None:
        step()
    except Exception as e:  # noqa: BLE001 - re-raised below, after the other steps
      first = first or e
  if first is not None:
    raise first


class Guard:
  """Host side of the non-finite guard and loss-spike warnings; never lets a diverged run write a checkpoint."""

  def __init__(self, cfg, log: metrics.Logger, ckpt: checkpoint.Checkpointer | None, wd=None):
    self.skip, self.log, self.ckpt, self.wd = cfg.train.skip_bad_steps, log, ckpt, wd
    self.spikes = faults.SpikeDetector(cfg.train.loss_spike_ratio, cfg.train.loss_spike_window)
    self.reported_bad = 0

  def check(self, row: dict | None) -> None:
    if not row:
      return
    diverged = faults.divergence(row)
    if diverged and not self.skip:
      last = self.ckpt.last_step if self.ckpt else None
      saved = f"last good checkpoint: step {last}" if last is not None else "no checkpoint had been written yet"
      self.log.event(row["step"], "diverged", f"{diverged}; {saved}")
      raise faults.Diverged(f"{diverged}; the update was not applied and nothing non-finite was saved; {saved}")
    if row.get("bad_steps", 0) > self.reported_bad:
      self.log.event(row["step"], "skipped_bad_steps", f"{diverged}; {int(row['bad_steps'])} updates skipped so far")
      self.reported_bad = row["bad_steps"]
    spike = self.spikes(row["loss"]) if "loss" in row else None
    if spike:
      self.log.event(row["step"], "loss_spike", spike)

  def save(self, step: int, state: TrainState) -> None:
    if not self.skip:  # a save is rare: read the guard's counters now rather than checkpoint a skipped step
      first_bad, what = jax.device_get((state.first_bad_step, state.bad_what))
      self.check({"step": step, "first_bad_step": int(first_bad), "bad_what": int(what)})
    self.ckpt.save(step, state, {"training_time": self.log.training_time})
    if self.wd is not None:
      self.wd.push()  # a remote workdir's metrics are at least as new as its newest checkpoint
