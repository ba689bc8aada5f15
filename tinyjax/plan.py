"""What a config will do, computed without allocating the model: sizes, budget, FLOPs, LRs, optimizer groups."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh

from tinyjax import config, flops, memory, optim, sharding
from tinyjax.model import ModelConfig, Transformer


def optimizer_groups(model_cfg: ModelConfig) -> dict[str, list[str]]:
  """{"muon": [paths], "adam": [paths]} from the abstract parameter tree (jax.eval_shape: nothing allocated)."""
  model = Transformer(model_cfg, eos_id=0)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32))["params"])
  groups = {"muon": [], "adam": []}
  for path, label in jax.tree_util.tree_leaves_with_path(optim.labels(shapes)):
    groups[label].append(optim.param_path(path))
  return groups


def describe(cfg, mesh, env_record: dict) -> dict:
  """The --dry_run JSON (and the head of run_info.json)."""
  model_cfg = ModelConfig.from_config(cfg.model)
  counts = flops.param_counts(model_cfg)
  steps = config.num_train_steps(cfg, counts["model_size"])
  per_step = config.tokens_per_step(cfg)
  fpt = flops.flops_per_token(model_cfg)
  lr, adam_lr = config.learning_rates(cfg)
  groups = optimizer_groups(model_cfg)
  if cfg.optimizer.name != "muon":
    groups = {"muon": [], "adam": groups["muon"] + groups["adam"]}
  return {
      **counts,
      "flops_per_token": fpt,
      "tokens_per_step": per_step,
      "num_train_steps": steps,
      "total_tokens": per_step * steps,
      "model_flops": flops.model_flops(model_cfg, per_step * steps),
      "budget": (f"num_train_steps={cfg.train.num_train_steps}" if cfg.train.num_train_steps > 0 else
                 f"chinchilla_multiple={cfg.train.chinchilla_multiple} x {config.CHINCHILLA_TOKENS_PER_PARAM}"
                 f" tokens/param x {cfg.train.nominal_params or counts['model_size']} params"),
      "learning_rate": lr,
      "adam_lr": adam_lr if cfg.optimizer.name == "muon" else None,
      "warmup_steps": config.warmup_steps(cfg, steps),
      "decay_steps": config.decay_steps(cfg, steps),
      "optimizer": cfg.optimizer.name,
      "optimizer_groups": groups,
      "mesh": sharding.describe(mesh, cfg.mesh.fsdp),
      "env": env_record,
  }


def memory_plan(cfg, mesh) -> dict:
  """The --dry_run memory plan: the real train step compiled (never run) for one device's share of the batch.

  With train.plan_num_devices = N the step is compiled on one local device for batch / N rows (what each of N
  data-parallel devices holds); otherwise on this mesh. Token ids are irrelevant to memory, so EOS is id 0 here.
  """
  from tinyjax import train  # noqa: PLC0415  (train imports plan)
  model_cfg = ModelConfig.from_config(cfg.model)
  model = Transformer(model_cfg, eos_id=0)
  counts = flops.param_counts(model_cfg)
  total = config.num_train_steps(cfg, counts["model_size"])
  tx = optim.make(cfg, total)
  data_size = cfg.train.plan_num_devices or mesh.shape[sharding.DATA]
  batch = cfg.train.train_batch_size // data_size
  if cfg.train.plan_num_devices:
    mesh = Mesh(np.asarray(mesh.devices.flat[:1]), (sharding.DATA,), axis_types=(AxisType.Auto,))
  else:
    batch = cfg.train.train_batch_size
  shapes = jax.eval_shape(lambda: train.init_state(model, tx, cfg.seed))
  state_sh = sharding.state_shardings(shapes, mesh, cfg.mesh.fsdp)
  batch_sh = sharding.batch_sharding(mesh)
  abstract = train.step_inputs(cfg, shapes, state_sh, batch_sh, batch)
  make = lambda a: train.make_train_step(model, tx, cfg, total, state_sh, batch_sh, accum=a)
  planner = memory.StepPlanner(cfg, make, abstract, cfg.train.train_batch_size // data_size)
  device = mesh.devices.flat[0]
  out = memory.report(planner, model_cfg, data_size, device.device_kind, device.platform)
  out["data_parallel_devices"] = data_size
  return out
