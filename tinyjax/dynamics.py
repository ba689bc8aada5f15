"""Training dynamics (train.dynamics_every): statistics of parameters, gradients, updates, activations, output logits
and attention logits, computed by a separately compiled variant of the train step and written to
workdir/dynamics.jsonl (one row per dynamics step, flat `group/path/quantity` keys), resumed like metrics.jsonl.

Keys (layer = the parameter path, e.g. layers_0/self_attn/q_proj/kernel):
  {params,grads,updates}/<path>/{norm,mean,max_abs,rms}      per leaf (so per layer)
  {params,grads,updates}/group/<module>/{norm,max_abs,rms}  per parameter group (q_proj, mlp down_proj, lm_head, ...)
  {params,grads,updates}/total/norm
  update_ratio/<path>, update_ratio/group/<module>          RMS(update) / RMS(parameter)
  activations/layers_<i>/{norm,mean,max_abs,rms}            each block's output (residual stream), per token
  logits/{mean,rms,max,logz_mean,logz_max}                  output logits and log-partition (what z-loss fights)
  attention/layers_<i>/head_<h>/{logit_max,logit_rms}       pre-softmax q.k/sqrt(K) (what QK-norm fights)
  attention/layers_<i>/entropy                              mean attention entropy (nats)
Activations, logits and attention are measured on the first train.dynamics_rows rows of the step's batch (one extra
forward pass without gradients); the update itself is the ordinary step's.
"""
from __future__ import annotations

import collections
import os

import jax
import jax.numpy as jnp

from tinyjax import optim
from tinyjax.runtime import metrics
from tinyjax.runtime.workdir import DYNAMICS as FILE


def _moments(x) -> dict:
  x = x.astype(jnp.float32)
  sumsq = jnp.sum(x * x)
  return {"sumsq": sumsq, "sum": jnp.sum(x), "max_abs": jnp.max(jnp.abs(x)), "count": x.size}


def _finish(m: dict) -> dict:
  return {"norm": jnp.sqrt(m["sumsq"]), "mean": m["sum"] / m["count"], "max_abs": m["max_abs"],
          "rms": jnp.sqrt(m["sumsq"] / m["count"])}


def tree_stats(tree, group: str) -> dict:
  """Per-leaf, per-group (module name) and total statistics of a parameter-shaped tree."""
  out, groups = {}, collections.defaultdict(list)
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  for path, leaf in leaves:
    name = optim.param_path(path)
    m = _moments(leaf)
    groups[name.split("/")[-2] if "/" in name else name].append(m)
    out.update({f"{group}/{name}/{q}": v for q, v in _finish(m).items()})
  for module, ms in groups.items():
    total = {"sumsq": sum(m["sumsq"] for m in ms), "sum": sum(m["sum"] for m in ms),
             "max_abs": jnp.max(jnp.stack([m["max_abs"] for m in ms])), "count": sum(m["count"] for m in ms)}
    out.update({f"{group}/group/{module}/{q}": v for q, v in _finish(total).items() if q != "mean"})
  out[f"{group}/total/norm"] = jnp.sqrt(sum(_moments(leaf)["sumsq"] for _, leaf in leaves))
  return out


def update_ratios(stats: dict) -> dict:
  """RMS(update) / RMS(parameter) for every leaf and group present in both."""
  return {f"update_ratio/{key[len('updates/'):-len('/rms')]}": value / stats["params/" + key[len("updates/"):]]
          for key, value in stats.items() if key.startswith("updates/") and key.endswith("/rms")}


def forward_stats(model, params, tokens_BL) -> dict:
  """Activations, output-logit and attention-logit statistics from one no-gradient forward pass."""
  logits_BLV, sown = model.clone(dynamics=True).apply({"params": params}, tokens_BL, mutable=["intermediates"])
  logits_BLV = jax.lax.stop_gradient(logits_BLV)
  logz_BL = jax.nn.logsumexp(logits_BLV, axis=-1)
  out = {"logits/mean": jnp.mean(logits_BLV), "logits/rms": jnp.sqrt(jnp.mean(logits_BLV ** 2)),
         "logits/max": jnp.max(logits_BLV), "logits/logz_mean": jnp.mean(logz_BL), "logits/logz_max": jnp.max(logz_BL)}
  for layer, values in sown["intermediates"].items():
    residual = values["residual"][0]
    D = residual.shape[-1]
    per_token = _finish(_moments(residual))
    out.update({f"activations/{layer}/{q}": v for q, v in per_token.items()})
    out[f"activations/{layer}/norm"] = per_token["rms"] * jnp.sqrt(D)  # per-token L2 norm (RMS over tokens)
    attn = values["self_attn"]
    for h in range(attn["logit_max"][0].shape[0]):
      out[f"attention/{layer}/head_{h}/logit_max"] = attn["logit_max"][0][h]
      out[f"attention/{layer}/head_{h}/logit_rms"] = attn["logit_rms"][0][h]
    out[f"attention/{layer}/entropy"] = attn["entropy"][0]
  return out


def collect(model, params, grads, updates, tokens_BL) -> dict:
  """Everything above for one step (params before the update)."""
  stats = {**tree_stats(params, "params"), **tree_stats(grads, "grads"), **tree_stats(updates, "updates")}
  return {**stats, **update_ratios(stats), **forward_stats(model, params, tokens_BL)}


class Log:
  """workdir/dynamics.jsonl (process 0): rows are fetched one push later (no stall), cut back on resume."""

  def __init__(self, workdir: str, start_step: int, sinks=()):
    self.workdir, self.path = workdir, os.path.join(workdir, FILE)
    self.is_main = jax.process_index() == 0
    if self.is_main:
      metrics.truncate(self.path, start_step)
    self.pending, self.sinks = None, list(sinks)

  def push(self, step: int, device_stats: dict) -> None:
    self.flush()
    self.pending = (step, device_stats)

  def flush(self) -> None:
    if self.pending is None:
      return
    step, values = self.pending
    self.pending = None
    row = {k: float(v) for k, v in jax.device_get(values).items()}
    if self.is_main:
      metrics.append(self.workdir, {"step": step, **row}, FILE)
      for sink in self.sinks:
        sink.write(step, row)


def read(workdir: str) -> list[dict]:
  return metrics.read(workdir, FILE)
