"""Eval sets: per-batch sums inside jit, Marin's bits-per-byte on the host.

Marin BPB (Levanter TaggedEvaluator): per batch, bpb_b = (sum of masked target NLL in nats) / max(sum of masked
target-token bytes, 1) * log2(e); the reported value is the mean of bpb_b weighted by each batch's masked-token
count. We also report the exact total-bits / total-bytes figure beside it (`bpb_exact`), and the rapid-ablation
metrics: next-token `accuracy` (argmax = target; ties count), `top5_accuracy` and `perplexity` = exp(loss), all
token-weighted over the set.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from tinyjax import data, sharding
from tinyjax.model import token_stats

LOG2_E = 1.0 / math.log(2.0)


def summarize(batch_sums: list[dict]) -> dict:
  """[{nll, tokens, bytes} per batch] -> {loss (nats/token), bpb (Marin), bpb_exact, tokens, bytes}."""
  nll = np.array([b["nll"] for b in batch_sums], np.float64)
  tokens = np.array([b["tokens"] for b in batch_sums], np.float64)
  nbytes = np.array([b["bytes"] for b in batch_sums], np.float64)
  bpb_batch = nll / np.maximum(nbytes, 1.0) * LOG2_E
  n = max(tokens.sum(), 1.0)
  loss = float(nll.sum() / n)
  out = {"loss": loss, "bpb": float((bpb_batch * tokens).sum() / n),
         "bpb_exact": float(nll.sum() / max(nbytes.sum(), 1.0) * LOG2_E),
         "tokens": int(tokens.sum()), "bytes": int(nbytes.sum()), "perplexity": math.exp(min(loss, 700.0))}
  for key, name in (("correct", "accuracy"), ("top5", "top5_accuracy")):  # token-weighted, as BPB's token mean
    if all(key in b for b in batch_sums):
      out[name] = float(sum(float(b[key]) for b in batch_sums) / n)
  return out


def make_eval_step(model, byte_lengths_V):
  byte_lengths_V = jnp.asarray(byte_lengths_V, jnp.int32)

  @jax.jit
  def step(params, tokens_BL, valid_B):
    stats, targets_BL, mask_BL = token_stats(model, params, tokens_BL)
    mask_BL = mask_BL * valid_B[:, None]
    return {"nll": (stats["nll"] * mask_BL).sum(), "tokens": mask_BL.sum(),
            "bytes": (byte_lengths_V[targets_BL] * mask_BL).sum(),
            "correct": (stats["correct"] * mask_BL).sum(), "top5": (stats["top5"] * mask_BL).sum()}
  return step


class Evaluator:
  """Evaluates every eval set of the config: {'eval/<name>/loss', 'eval/<name>/bpb', ...}."""

  def __init__(self, model, ds: data.Dataset, cfg, batch_sharding):
    self.ds, self.cfg, self.batch_sharding = ds, cfg, batch_sharding
    self.step = make_eval_step(model, ds.byte_lengths)

  def __call__(self, params, step: int | None = None) -> dict:
    out = {}
    with jax.set_mesh(self.batch_sharding.mesh):  # traced on first use: Pallas attention kernels run per shard
      for name in self.ds.eval_caches:
        out.update(self._one(params, name))
    return out

  def _one(self, params, name: str) -> dict:
    sums = [self.step(params, sharding.to_global(tokens, self.batch_sharding),
                      sharding.to_global(valid, self.batch_sharding))
            for tokens, valid in data.eval_batches(self.ds, self.cfg, name, jax.process_index(),
                                                   jax.process_count())]
    return {f"eval/{name}/{key}": value for key, value in summarize(jax.device_get(sums)).items()}
