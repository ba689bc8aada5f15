"""The FLOP audit: the matmul FLOPs one train step executes, counted in its jaxpr, against the FLOPs Marin credits.

Counting rule: every dot_general is 2·M·N·K (batch dimensions included); a scan body counts times its length, a
cond as its largest branch, a shard_map body once per device; rematerialised (jax.checkpoint) and custom-VJP bodies
count as traced, so a recompute counts again. Nothing is compiled: this is the work the program asks for. The
optimizer (Muon's Newton-Schulz matmuls) is traced and counted on its own and kept out of the ratio. Marin credits
3 x forward FLOPs per token x tokens (flops.model_flops), so executed / model > 1 is repeated work (a recompute)
and < 1 is work the formula credits but the step skips (the future half of a causal attention map); a device that
ran every matmul at peak and nothing else would reach an MFU of model / executed.
"""
from __future__ import annotations

import dataclasses
import math
import types

import jax
import jax.numpy as jnp
from jax.extend import core as jex_core

from tinyjax import flops, sharding, step
from tinyjax.kernels import loss
from tinyjax.model import ModelConfig

PALLAS_ATTENTION = ("splash", "pallas_gpu")  # opaque custom calls: counted as blockwise, which skips the same blocks


def dot_flops(eqn) -> int:
  """2 x (output elements) x (contracted elements) of one dot_general."""
  (lhs_contract, _), _ = eqn.params["dimension_numbers"]
  lhs_shape = eqn.invars[0].aval.shape
  return 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs_shape[d] for d in lhs_contract)


def _sub_jaxprs(value):
  """The jaxprs held by one eqn parameter (a jaxpr, a closed jaxpr, or a tuple of them)."""
  if isinstance(value, jex_core.ClosedJaxpr):
    return [value.jaxpr]
  if isinstance(value, jex_core.Jaxpr):
    return [value]
  if isinstance(value, (tuple, list)):
    return [j for v in value for j in _sub_jaxprs(v)]
  return []


def jaxpr_flops(jaxpr) -> int:
  """Matmul FLOPs of a (closed) jaxpr by the module's counting rule; a while loop (unknown trip count) is refused."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      total += dot_flops(eqn)
    elif name == "scan":
      total += eqn.params["length"] * jaxpr_flops(eqn.params["jaxpr"])
    elif name == "cond":
      total += max(jaxpr_flops(b) for b in eqn.params["branches"])
    elif name == "while":
      if jaxpr_flops(eqn.params["body_jaxpr"]) or jaxpr_flops(eqn.params["cond_jaxpr"]):
        raise ValueError("a while loop holds matmuls: its trip count is unknown to the audit")
    elif name == "shard_map":
      mesh = eqn.params["mesh"]
      devices = math.prod(mesh.shape[a] for a in eqn.params["newly_manual_axes"])
      total += devices * jaxpr_flops(eqn.params["jaxpr"])
    else:  # pjit, checkpoint (remat), custom_jvp_call, custom_vjp_call, closed_call, ...: their bodies as traced
      total += sum(jaxpr_flops(j) for v in eqn.params.values() for j in _sub_jaxprs(v))
  return total


def counted_model(model_cfg: ModelConfig, platform: str) -> ModelConfig:
  """The model the audit traces: the Pallas attention kernels are opaque custom calls, so they are counted as the
  blockwise attention, which skips the same fully masked causal blocks (attention.py); the Pallas loss as the XLA
  fused loss, whose three lm_head matmuls it also does (`pallas_recompute_flops` adds its recompute)."""
  if model_cfg.attention_impl(platform) in PALLAS_ATTENTION:
    model_cfg = dataclasses.replace(model_cfg, attention="blockwise")
  if model_cfg.loss_kernel(platform) in loss.PALLAS:
    model_cfg = dataclasses.replace(model_cfg, loss_impl="fused", kernel_interpret=False)
  return model_cfg


def pallas_recompute_flops(model_cfg: ModelConfig, platform: str, tokens: int) -> int:
  """The lm_head matmul the Pallas loss adds to the fused loss's three: its logits, recomputed once for the lm_head's
  gradient (kernels/pallas_loss.py: 4 matmuls), 2·tokens·D·V."""
  if model_cfg.loss_kernel(platform) not in loss.PALLAS or not model_cfg.loss_block_size:
    return 0
  return 2 * tokens * model_cfg.hidden_dim * model_cfg.vocab_size


def flop_audit(cfg, mesh) -> dict:
  """The audit of one train step of cfg, traced for one of its data-parallel devices (train.plan_num_devices, else
  the mesh's data axis: that device's share of the batch, in train.grad_accum_steps microbatches, 0 = auto counted
  as 1) and scaled to the whole step; the --dry_run JSON's "flop_audit"."""
  data_size = cfg.train.plan_num_devices or mesh.shape[sharding.DATA]
  platform = mesh.devices.flat[0].platform
  configured = ModelConfig.from_config(cfg.model)
  model_cfg = counted_model(configured, platform)
  per_device = cfg.train.train_batch_size // data_size
  accum = max(cfg.train.grad_accum_steps, 1)
  one = sharding.make_mesh(types.SimpleNamespace(data=1))  # one device's share, traced (never compiled)
  built = step.build(cfg, one, model_cfg=model_cfg)
  shapes = built.shapes
  tokens = jax.ShapeDtypeStruct((per_device, model_cfg.seq_len), jnp.int32)
  step_fn, tx = built.make(accum), built.tx
  total = data_size * jaxpr_flops(jax.make_jaxpr(step_fn)(shapes, tokens))
  total += pallas_recompute_flops(configured, platform, cfg.train.train_batch_size * model_cfg.seq_len)
  optimizer = jaxpr_flops(jax.make_jaxpr(tx.update)(shapes.params, shapes.opt_state, shapes.params))
  executed = total - data_size * optimizer  # every data-parallel device runs the whole update
  model_flops = flops.model_flops(model_cfg, cfg.train.train_batch_size * model_cfg.seq_len)
  return {
      "attention": model_cfg.attention_impl(platform),
      "loss_impl": configured.loss_kernel(platform) if model_cfg.loss_block_size else "unblocked",
      "per_device_batch": per_device, "data_parallel_devices": data_size, "grad_accum_steps": accum,
      "executed_flops_per_step": executed,
      "optimizer_flops_per_step": data_size * optimizer,
      "model_flops_per_step": model_flops,
      "executed_over_model": executed / model_flops,
      "perfect_device_mfu": model_flops / executed,
      "perfect_device_mfu_with_optimizer": model_flops / (executed + data_size * optimizer),
  }
