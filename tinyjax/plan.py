"""What a config will do, computed without allocating the model: sizes, budget, FLOPs, LRs, optimizer groups."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh

from tinyjax import config, flops, optim, sharding
from tinyjax.hardware import memory, targets
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


def step_planner(cfg, mesh, platform: str, batch: int) -> tuple[memory.StepPlanner, ModelConfig]:
  """The real train step for `batch` rows on `mesh`, traced as `platform` runs it (its attention kernel), ready to
  compile at any gradient accumulation. Token ids are irrelevant to memory, so EOS is id 0 here."""
  from tinyjax import train  # noqa: PLC0415  (train imports plan)
  model_cfg = ModelConfig.from_config(cfg.model).for_platform(platform)
  model = Transformer(model_cfg, eos_id=0)
  total = config.num_train_steps(cfg, flops.param_counts(model_cfg)["model_size"])
  tx = optim.make(cfg, total)
  shapes = jax.eval_shape(lambda: train.init_state(model, tx, cfg.seed))
  state_sh = sharding.state_shardings(shapes, mesh, cfg.mesh.fsdp)
  batch_sh = sharding.batch_sharding(mesh)
  abstract = train.step_inputs(cfg, shapes, state_sh, batch_sh, batch)
  make = lambda a: train.make_train_step(model, tx, cfg, total, state_sh, batch_sh, accum=a)
  return memory.StepPlanner(cfg, make, abstract, batch // mesh.shape[sharding.DATA]), model_cfg


def one_device_mesh(mesh) -> Mesh:
  return Mesh(np.asarray(mesh.devices.flat[:1]), (sharding.DATA,), axis_types=(AxisType.Auto,))


def memory_plan(cfg, mesh) -> dict:
  """The --dry_run memory plan of this machine's compiler: the real train step compiled (never run).

  With train.plan_num_devices = N the step is compiled on one local device for batch / N rows (what each of N
  data-parallel devices holds); otherwise on this mesh.
  """
  data_size = cfg.train.plan_num_devices or mesh.shape[sharding.DATA]
  batch = cfg.train.train_batch_size
  if cfg.train.plan_num_devices:
    mesh, batch = one_device_mesh(mesh), batch // data_size
  device = mesh.devices.flat[0]
  planner, model_cfg = step_planner(cfg, mesh, device.platform, batch)
  out = memory.report(planner, model_cfg, data_size, device.device_kind, device.platform)
  out["data_parallel_devices"] = data_size
  return out


def target_figures(cfg, planner: memory.StepPlanner, model_cfg: ModelConfig, target, search: bool = True) -> dict:
  """The plan fields every target reports, whichever compiler produced them."""
  accum, auto, info, fit = planner.plan_for(target.memory_bytes, target.platform, search)
  return {"accum": accum, "per_device_batch": planner.per_device_batch,
          "configured_grad_accum_steps": cfg.train.grad_accum_steps, "grad_accum_steps": auto,
          "attention": model_cfg.attention, **{f"{k}_gib": v for k, v in memory.gib(info).items()}, **fit}


def proxy_plan(cfg, mesh, target) -> dict:
  """A target's plan from this machine's compiler (its own is not installed): the step for one chip's share of
  the batch compiled here, with this machine's attention kernel (a Pallas TPU/GPU kernel compiles only for its
  device); the figures are the local compiler's, labelled so."""
  local = mesh.devices.flat[0].platform
  planner, model_cfg = step_planner(cfg, one_device_mesh(mesh), local, cfg.train.train_batch_size // target.chips)
  return {"compiler": f"cpu-proxy ({jax.default_backend()} compiler, jax {jax.__version__}; "
                      f"{targets.install_hint(target.platform)} for the target's own)",
          **target.describe(), **target_figures(cfg, planner, model_cfg, target), "kernels": None}


def dry_run(cfg, mesh, env_record: dict, dry: bool, target_names: str) -> dict:
  """The --dry_run JSON: the planned run and its memory plan, from this machine's compiler or, with --target, from
  each target's own (a CPU proxy, labelled, where that compiler is not installed)."""
  if not dry:
    raise config.ConfigError(f"--target={target_names} plans a run: add --dry_run (the run itself uses the devices "
                             "it finds)")
  chosen = targets.parse_list(target_names)
  if chosen:
    from tinyjax.hardware import aot  # noqa: PLC0415
    memory_block = {"targets": aot.plans(cfg, chosen, proxy=lambda t: proxy_plan(cfg, mesh, t))}
  else:
    memory_block = memory_plan(cfg, mesh)
  from tinyjax import audit  # noqa: PLC0415
  return {**describe(cfg, mesh, env_record), "memory": memory_block, "flop_audit": audit.flop_audit(cfg, mesh)}
