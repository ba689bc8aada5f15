"""Bits-per-byte exactly as Marin defines it, on cases small enough to compute by hand; the Evaluator's metric names."""
import math

import jax.numpy as jnp
import numpy as np
import pytest

from tinyjax import data, evaluate, sharding
from tinyjax.kernels import loss


class FixedLogitsModel:
  """Stands in for Transformer: the same logits vector at every position (all zero by default, so every target
  costs exactly ln(V) nats); with targets it returns the loss statistics, as Transformer does."""

  def __init__(self, vocab, logits_V=None):
    self.logits_V = jnp.zeros(vocab) if logits_V is None else jnp.asarray(logits_V, jnp.float32)

  def apply(self, variables, tokens_BL, targets_BL):
    B, L = tokens_BL.shape  # hidden state 1 at every position, lm_head = the logits row
    return loss.reference_stats(jnp.ones((B, L, 1)), self.logits_V[None], targets_BL)


UniformModel = FixedLogitsModel


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


def test_accuracy_top5_and_perplexity_by_hand():
  """Logits 7, 6, ..., 0 for ids 0..7 at every position; targets 1, 2, 6 (the last position has none).
  accuracy: no target is the argmax (id 0) -> 0; top-5: ids 1 and 2 have fewer than 5 ids above them, id 6 has 6
  -> 2/3; perplexity = exp(mean NLL), NLL = logsumexp(7..0) - logit(target)."""
  logits = np.arange(7, -1, -1, dtype=np.float64)
  step = evaluate.make_eval_step(FixedLogitsModel(8, logits), np.ones(8, np.int32))
  sums = step({}, jnp.array([[0, 1, 2, 6]]), jnp.array([True]))
  out = evaluate.summarize([sums])
  logz = math.log(np.exp(logits).sum())
  mean_nll = np.mean([logz - logits[t] for t in (1, 2, 6)])
  assert out["accuracy"] == 0.0
  assert out["top5_accuracy"] == pytest.approx(2 / 3, rel=1e-6)
  assert out["loss"] == pytest.approx(mean_nll, rel=1e-6)
  assert out["perplexity"] == pytest.approx(math.exp(mean_nll), rel=1e-5)
  # The argmax target counts as correct; accuracy is token-weighted across batches like BPB's token mean.
  hit = step({}, jnp.array([[0, 0, 0, 0]]), jnp.array([True]))
  both = evaluate.summarize([sums, hit])
  assert both["accuracy"] == pytest.approx(3 / 6) and both["top5_accuracy"] == pytest.approx(5 / 6)


def test_evaluator_names_metrics_eval_name_bpb(small_cfg):
  """Through evaluate.Evaluator with an all-zero-logit model on an eval set named like Marin's (with a '/'): keys
  eval/paloma/c4_en/{loss,bpb,...}, and the loss is ln V nats per target token."""
  cfg = small_cfg(**{"data.validation_urls": {"paloma/c4_en": ["builtin:python-docs/validation"]}})
  ds = data.prepare(cfg)
  assert set(ds.eval_caches) == {"paloma/c4_en"}, "eval-set names may contain '/' (Marin's paloma/<subset>)"
  out = evaluate.Evaluator(FixedLogitsModel(512), ds, cfg, sharding.batch_sharding(sharding.make_mesh(cfg.mesh)))({})
  assert {"eval/paloma/c4_en/loss", "eval/paloma/c4_en/bpb"} <= out.keys(), sorted(out)
  assert out["eval/paloma/c4_en/loss"] == pytest.approx(np.log(512), rel=1e-5)
  assert out["eval/paloma/c4_en/bytes"] > 0 and 0 < out["eval/paloma/c4_en/bpb_exact"] < 20
