"""The FLOP audit counts every matmul of the train step from its jaxpr: the model's (against Marin's formula), the
blockwise attention's causal blocks, the loss's recomputed logits, Muon's Newton-Schulz steps, and scan and
shard_map bodies once per iteration and device."""
import types

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from tinyjax import audit, flops, sharding
from tinyjax.model import ModelConfig

ONE_DEVICE = lambda: sharding.make_mesh(types.SimpleNamespace(data=1))


@pytest.fixture
def audit_cfg(small_cfg):
  """The small config with 4 query heads over 2 kv heads, seq 128 in fp32, batch 4: hand-countable matmuls."""
  return lambda loss_impl, attention="reference": small_cfg(**{
      "model.num_heads": 4, "model.seq_len": 128, "model.compute_dtype": "float32", "model.attention": attention,
      "model.attention_block": 32, "model.loss_impl": loss_impl, "model.loss_block_size": 128,
      "train.train_batch_size": 4, "train.num_train_steps": 10})


@pytest.mark.parametrize("loss_impl,recomputed_head_matmuls", [("fused", 0), ("blockwise", 1)])
def test_audit_counts_every_matmul_of_the_train_step(audit_cfg, loss_impl, recomputed_head_matmuls):
  """Hand count of the tiny step's jaxpr: 3 x Marin's forward FLOPs per token minus the 3·S·H softmax FLOPs per layer
  it credits (not matmuls), plus one more [tokens, D] x [D, V] matmul when the blockwise loss recomputes the logits;
  Muon's 5 Newton-Schulz steps on every hidden matrix (m <= n: x x^T, gram^2, gram x = 4m²n + 2m³) apart."""
  cfg = audit_cfg(loss_impl)
  out = audit.flop_audit(cfg, ONE_DEVICE())
  c = ModelConfig.from_config(cfg.model)
  tokens, S, H, D, V = 4 * 128, 128, 4, 32, 512
  expected = 3 * tokens * (flops.flops_per_token(c) - c.num_layers * 3 * S * H)
  assert out["executed_flops_per_step"] == expected + recomputed_head_matmuls * 2 * tokens * D * V
  assert out["model_flops_per_step"] == flops.model_flops(c, tokens)
  matrices = [(32, 32), (32, 16), (32, 16), (32, 32), (32, 64), (32, 64), (64, 32)] * 2  # q k v o gate up down
  ns = lambda m, n: 4 * m * m * n + 2 * m ** 3
  assert out["optimizer_flops_per_step"] == 5 * sum(ns(min(s), max(s)) for s in matrices)
  assert out["executed_over_model"] == pytest.approx(out["executed_flops_per_step"] / out["model_flops_per_step"])


def test_audit_counts_the_causal_blocks_of_the_blockwise_attention(audit_cfg):
  """Blockwise attention (4 blocks of 32 per row): 7 matmuls per causal (query, key) block pair, 10 pairs of the 16
  a full map has, plus the backward's rowsum(dout * out); the credited full map is 6 per pair of 16."""
  reference = audit.flop_audit(audit_cfg("fused", "reference"), ONE_DEVICE())
  blockwise = audit.flop_audit(audit_cfg("fused", "blockwise"), ONE_DEVICE())
  pair = 2 * 4 * 4 * 32 * 32 * 8  # B 4, H 4, a 32 x 32 block, head_dim 8: one matmul of one pair
  per_layer = 7 * 10 * pair + 2 * 4 * 128 * 4 * 8 - 6 * 16 * pair
  assert blockwise["executed_flops_per_step"] - reference["executed_flops_per_step"] == 2 * per_layer


def test_audit_counts_scan_and_shard_map_bodies_per_iteration_and_device():
  """A scan body counts once per iteration, a shard_map body once per device: both sum to the unsplit matmul."""
  a, b = jax.ShapeDtypeStruct((64, 32), jnp.float32), jax.ShapeDtypeStruct((32, 16), jnp.float32)
  whole = 2 * 64 * 32 * 16
  mesh = sharding.make_mesh(types.SimpleNamespace(data=8))
  per_shard = jax.shard_map(lambda a, b: a @ b, mesh=mesh, in_specs=(P("data"), P()), out_specs=P("data"))
  assert audit.jaxpr_flops(jax.make_jaxpr(per_shard)(a, b)) == whole
  scanned = lambda a, b: jax.lax.scan(lambda c, a_rows: (c, a_rows @ b), None, a.reshape(4, 16, 32))[1]
  assert audit.jaxpr_flops(jax.make_jaxpr(scanned)(a, b)) == whole


def test_the_pallas_loss_is_counted_with_its_recompute(audit_cfg):
  """The Pallas loss (interpreted here) does the fused loss's three lm_head matmuls and recomputes the logits once."""
  from tinyjax import audit, sharding  # noqa: PLC0415
  mesh = sharding.make_mesh(type("Mesh", (), {"data": 1})())
  fused = audit.flop_audit(audit_cfg("fused"), mesh)
  cfg = audit_cfg("pallas_gpu")
  cfg.model.kernel_interpret = True
  pallas = audit.flop_audit(cfg, mesh)
  m = cfg.model
  extra = 2 * cfg.train.train_batch_size * m.seq_len * m.hidden_dim * m.vocab_size
  assert pallas["loss_impl"] == "pallas_gpu"
  assert pallas["executed_flops_per_step"] == fused["executed_flops_per_step"] + extra
