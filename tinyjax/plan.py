"""What a config will do, computed without allocating the model: sizes, budget, FLOPs, LRs, optimizer groups."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from tinyjax import config, flops, optim, sharding, step
from tinyjax.hardware import hlo, memory, targets
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


def one_device_mesh(mesh) -> Mesh:
  return sharding.make_mesh(ml_collections.ConfigDict({"data": 1}), mesh.devices.flat)


def memory_plan(cfg, mesh, hlo_dir: str = "") -> dict:
  """The --dry_run memory plan of this machine's compiler: analytic parts, XLA's compiled figures (the real step,
  compiled, never run), and fits per device (GiB). With train.plan_num_devices = N the step is compiled on one local
  device for batch / N rows (what each of N data-parallel devices holds); otherwise on this mesh."""
  data_size = cfg.train.plan_num_devices or mesh.shape[sharding.DATA]
  batch = cfg.train.train_batch_size
  if cfg.train.plan_num_devices:
    mesh, batch = one_device_mesh(mesh), batch // data_size
  built = step.build(cfg, mesh)
  device, planner, accum, info, fit = step.plan_for_device(built, cfg, batch)
  model_cfg = built.model.cfg
  out = {"per_device_batch": planner.per_device_batch, "grad_accum_steps": accum,
         "grad_accum_auto": cfg.train.grad_accum_steps == 0, "attention": model_cfg.attention,
         "analytic_gib": memory.gib(memory.analytic(cfg, model_cfg, planner.per_device_batch, accum, data_size,
                                                    device.platform)),
         "compiled_gib": {**memory.gib(info), "backend": device.platform},
         "devices": {f"local ({device.device_kind})": {**fit, "grad_accum_steps": accum}},
         "data_parallel_devices": data_size}
  executable = planner.executables.get(accum)
  if executable is not None:
    out["roofline"] = targets.local_roofline(executable.as_text(), model_cfg, cfg.train.train_batch_size, data_size,
                                             device)
    if hlo_dir:
      hlo.write_module(hlo_dir, "local", executable.as_text())
  for name, (kind, platform) in memory.PLAN_DEVICES.items():  # the local compile's figures against each device
    a, i, f = planner.choose(memory.device_memory(kind), platform)
    out["devices"][name] = {**f, "grad_accum_steps": a, "peak_gib": round(i["peak"] / memory.GIB, 3),
                            "compiler": "cpu-proxy"}
  return out


def proxy_plan(cfg, mesh, target) -> dict:
  """A target's plan from this machine's compiler (its own is not installed): the step for one chip's share of
  the batch compiled here, with this machine's attention kernel (a Pallas TPU/GPU kernel compiles only for its
  device); the figures are the local compiler's, labelled so."""
  built = step.build(cfg, one_device_mesh(mesh))
  planner = built.planner(cfg.train.train_batch_size // target.chips)
  return {"compiler": f"cpu-proxy ({jax.default_backend()} compiler, jax {jax.__version__}; "
                      f"{targets.install_hint(target.platform)} for the target's own)",
          **target.describe(), **step.plan_figures(planner, built.model.cfg.attention, target.memory_bytes, target.platform), "kernels": None,
          "roofline": None, "roofline_note": f"needs {target.name}'s own compiled module: "
                                             f"{targets.install_hint(target.platform)}"}


def dry_run(cfg, mesh, env_record: dict, dry: bool, target_names: str, hlo_dir: str = "") -> dict:
  """The --dry_run JSON: the planned run and its memory plan, from this machine's compiler or, with --target, from
  each target's own (a CPU proxy, labelled, where that compiler is not installed)."""
  if not dry:
    flag = f"--target={target_names}" if target_names else f"--hlo_dir={hlo_dir}"
    raise config.ConfigError(f"{flag} plans a run: add --dry_run (the run itself uses the devices it finds)")
  chosen = targets.parse_list(target_names)
  if chosen:
    from tinyjax import aot  # noqa: PLC0415
    memory_block = {"targets": aot.plans(cfg, chosen, proxy=lambda t: proxy_plan(cfg, mesh, t), hlo_dir=hlo_dir)}
  else:
    memory_block = memory_plan(cfg, mesh, hlo_dir)
  from tinyjax import audit  # noqa: PLC0415
  return {**describe(cfg, mesh, env_record), "memory": memory_block, "flop_audit": audit.flop_audit(cfg, mesh)}
