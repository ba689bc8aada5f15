"""Eval sets: per-batch sums inside jit, Marin's bits-per-byte on the host.

Marin BPB (Levanter TaggedEvaluator): per batch, bpb_b = (sum of masked target NLL in nats) / max(sum of masked
target-token bytes, 1) * log2(e); the reported value is the mean of bpb_b weighted by each batch's masked-token
count. We also report the exact total-bits / total-bytes figure beside it (`bpb_exact`).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from tinyjax import data, sharding
from tinyjax.model import token_losses

LOG2_E = 1.0 / math.log(2.0)


def summarize(batch_sums: list[dict]) -> dict:
  """[{nll, tokens, bytes} per batch] -> {loss (nats/token), bpb (Marin), bpb_exact, tokens, bytes}."""
  nll = np.array([b["nll"] for b in batch_sums], np.float64)
  tokens = np.array([b["tokens"] for b in batch_sums], np.float64)
  nbytes = np.array([b["bytes"] for b in batch_sums], np.float64)
  bpb_batch = nll / np.maximum(nbytes, 1.0) * LOG2_E
  n = max(tokens.sum(), 1.0)
  return {"loss": float(nll.sum() / n), "bpb": float((bpb_batch * tokens).sum() / n),
          "bpb_exact": float(nll.sum() / max(nbytes.sum(), 1.0) * LOG2_E),
          "tokens": int(tokens.sum()), "bytes": int(nbytes.sum())}


def make_eval_step(model, byte_lengths_V):
  byte_lengths_V = jnp.asarray(byte_lengths_V, jnp.int32)

  @jax.jit
  def step(params, tokens_BL, valid_B):
    nll_BL, _, targets_BL, mask_BL = token_losses(model.apply({"params": params}, tokens_BL), tokens_BL)
    mask_BL = mask_BL * valid_B[:, None]
    return {"nll": (nll_BL * mask_BL).sum(), "tokens": mask_BL.sum(),
            "bytes": (byte_lengths_V[targets_BL] * mask_BL).sum()}
  return step


class Evaluator:
  """Evaluates every eval set of the config: {'eval/<name>/loss', 'eval/<name>/bpb', ...}."""

  def __init__(self, model, ds: data.Dataset, cfg, batch_sharding):
    self.ds, self.cfg, self.batch_sharding = ds, cfg, batch_sharding
    self.step = make_eval_step(model, ds.byte_lengths)

  def __call__(self, params, step: int | None = None) -> dict:
    out = {}
    for name in self.ds.eval_caches:
      sums = [self.step(params, sharding.to_global(tokens, self.batch_sharding),
                        sharding.to_global(valid, self.batch_sharding))
              for tokens, valid in data.eval_batches(self.ds, self.cfg, name, jax.process_index(),
                                                     jax.process_count())]
      for key, value in summarize(jax.device_get(sums)).items():
        out[f"eval/{name}/{key}"] = value
    return out
