"""Train state, the jitted train step (with gradient accumulation), and the training loop `run(cfg, workdir)`."""
from __future__ import annotations

import json
import os
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from tinyjax import config, data, evaluate, metrics, optim, plan, sharding
from tinyjax.model import ModelConfig, Transformer, token_losses


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array
  params: Any
  opt_state: Any


def init_state(model: Transformer, tx: optax.GradientTransformation, seed: int) -> TrainState:
  tokens_BL = jnp.zeros((1, model.cfg.seq_len), jnp.int32)
  params = model.init(jax.random.key(seed), tokens_BL)["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def loss_fn(model: Transformer, z_loss_weight: float):
  """params, tokens[B, L] -> (loss incl. z-loss, (mean NLL in nats/token))."""
  def fn(params, tokens_BL):
    nll_BL, logz_BL, _, mask_BL = token_losses(model.apply({"params": params}, tokens_BL), tokens_BL)
    n = mask_BL.sum()
    loss = (nll_BL * mask_BL).sum() / n
    return loss + z_loss_weight * (logz_BL ** 2 * mask_BL).sum() / n, loss
  return fn


def make_train_step(model, tx, cfg, total_steps: int, state_shardings, batch_sharding):
  """(state, tokens[B, L]) -> (state, metrics), jitted with explicit shardings and the state donated."""
  grad_fn = jax.value_and_grad(loss_fn(model, cfg.train.z_loss_weight), has_aux=True)
  accum = cfg.train.grad_accum_steps
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
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    out = {"loss": loss, "grad_norm": optax.tree.norm(grads),
           **optim.current_learning_rates(cfg, total_steps, state.step)}
    return TrainState(state.step + 1, optax.apply_updates(state.params, updates), opt_state), out

  return jax.jit(step, in_shardings=(state_shardings, batch_sharding), out_shardings=(state_shardings, None),
                 donate_argnums=0)


def run(cfg, workdir: str, env_record: dict) -> dict:
  """Trains cfg to completion in workdir; returns the final metrics."""
  os.makedirs(workdir, exist_ok=True)
  mesh = sharding.make_mesh(cfg.mesh)
  ds = data.prepare(cfg)
  model = Transformer(ModelConfig.from_config(cfg.model), eos_id=ds.eos_id)
  info = plan.describe(cfg, mesh, env_record)
  total = info["num_train_steps"]
  tx = optim.make(cfg, total)

  init = lambda: init_state(model, tx, cfg.seed)
  state_sh = sharding.state_shardings(jax.eval_shape(init), mesh, cfg.mesh.fsdp)
  state = jax.jit(init, out_shardings=state_sh)()
  batch_sh = sharding.batch_sharding(mesh)
  train_step = make_train_step(model, tx, cfg, total, state_sh, batch_sh)
  evaluator = evaluate.Evaluator(model, ds, cfg, batch_sh)

  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(cfg.to_json_best_effort(indent=2, sort_keys=True))
    with open(os.path.join(workdir, "run_info.json"), "w") as f:
      json.dump(info, f, indent=2, sort_keys=True)
  log = metrics.Logger(workdir, total, config.tokens_per_step(cfg), cfg.train.log_every)
  batches = data.train_batches(ds, cfg, 0, jax.process_index(), jax.process_count())
  last = {}
  for step in range(1, total + 1):  # `step` counts completed updates
    state, out = train_step(state, sharding.to_global(next(batches), batch_sh))
    log.push(step, out)  # fetches the previous log step's metrics only: the dispatch queue never stalls
    if step % cfg.train.steps_per_eval == 0 or step == total:
      log.flush()
      last = evaluator(state.params, step)
      log.write(step, last)
  log.flush()
  return {**log.last, **last}
