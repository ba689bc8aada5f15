"""Bits-per-byte exactly as Marin defines it, on cases small enough to compute by hand."""
import math

import jax.numpy as jnp
import numpy as np
import pytest

from tinyjax import evaluate


class UniformModel:
  """Stands in for Transformer: all-zero logits, so every target costs exactly ln(V) nats."""

  def __init__(self, vocab):
    self.vocab = vocab

  def apply(self, variables, tokens_BL):
    return jnp.zeros(tokens_BL.shape + (self.vocab,), jnp.float32)


def test_eval_step_uses_target_bytes_and_masks():
  # V = 4, byte lengths by id: 0 (special), 1, 2, 3. Row 0 targets are ids 1, 2, 3 (the last position has no
  # target); row 1 is padding. Bits = 3 * log2(4) = 6, bytes = 1 + 2 + 3 = 6, so BPB = 1 exactly.
  step = evaluate.make_eval_step(UniformModel(4), np.array([0, 1, 2, 3]))
  sums = step({}, jnp.array([[0, 1, 2, 3], [3, 3, 3, 3]]), jnp.array([True, False]))
  assert float(sums["tokens"]) == 3 and float(sums["bytes"]) == 6, "bytes must be those of the TARGET tokens"
  assert float(sums["nll"]) == pytest.approx(3 * math.log(4), rel=1e-6)
  assert evaluate.summarize([sums])["bpb"] == pytest.approx(1.0, rel=1e-6)


def test_summarize_is_token_weighted_mean_of_batch_ratios():
  """Marin: mean over batches of (nats/bytes * log2 e) weighted by tokens, NOT total bits / total bytes."""
  batches = [{"nll": 10.0, "tokens": 4, "bytes": 20}, {"nll": 30.0, "tokens": 12, "bytes": 30}]
  out = evaluate.summarize(batches)
  log2e = 1 / math.log(2)
  assert out["bpb"] == pytest.approx((4 * (10 / 20) + 12 * (30 / 30)) / 16 * log2e, rel=1e-12)  # 0.875 * log2 e
  assert out["bpb_exact"] == pytest.approx(40 / 50 * log2e, rel=1e-12)  # 0.8 * log2 e
  assert out["loss"] == pytest.approx(40 / 16, rel=1e-12), "loss is nats per token over all batches"
  assert out["tokens"] == 16 and out["bytes"] == 50


def test_zero_byte_batch_uses_max_one():
  """Levanter divides by max(bytes, 1): a batch of only special-token targets does not divide by zero."""
  out = evaluate.summarize([{"nll": 2.0, "tokens": 1, "bytes": 0}])
  assert out["bpb"] == pytest.approx(2.0 / math.log(2), rel=1e-12)
