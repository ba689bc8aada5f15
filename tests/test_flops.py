"""Parameter counts and FLOPs reproduce Marin's published numbers to the last digit; the FLOP audit counts every
matmul of the train step."""
import json
import os
import types

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from tinyjax import audit, config, flops, sharding
from tinyjax.model import ModelConfig

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared")

# ../shared/reference/marin-speedrun.md §2 table: params, non-embedding, fwd FLOPs/token @1024, @4096.
TABLE = {
    "llama_nano": (8_241_312, 32_928, 8_548_352, 9_371_648),
    "llama_30m": (33_784_960, 951_424, 36_855_808, 43_220_992),
    "llama_50m": (50_874_048, 1_623_744, 55_664_640, 65_175_552),
    "llama_75m": (73_273_600, 7_606_528, 89_358_336, 114_819_072),
    "llama_150m": (154_147_328, 22_813_184, 189_677_568, 227_868_672),
    "llama_300m": (299_649_792, 102_648_576, 440_451_072, 555_024_384),
}


def _model(name, seq_len=1024):
  cfg = config.base()
  config.marin_model(cfg, name)
  cfg.model.seq_len = seq_len
  return ModelConfig.from_config(cfg.model)


@pytest.mark.parametrize("name", sorted(TABLE))
def test_marin_table(name):
  params, non_emb, fpt1024, fpt4096 = TABLE[name]
  counts = flops.param_counts(_model(name))
  assert counts["model_size"] == params, "total_trainable_params formula drifted from Levanter's"
  assert counts["non_embedding_params"] == non_emb
  assert flops.flops_per_token(_model(name), 1024) == fpt1024, "lm_flops_per_token drifted from Levanter's"
  assert flops.flops_per_token(_model(name), 4096) == fpt4096


def _runs():
  with open(os.path.join(SHARED, "marin", "runs.json")) as f:
    return {r["run_name"]: r for r in json.load(f)}


@pytest.mark.parametrize("run,name,seq,tokens", [
    ("llama_30m", "llama_30m", 1024, 786_432_000),
    ("llama_75m", "llama_75m", 1024, 3_145_728_000),
    ("muon_llama_scaling/130m", "llama_150m", 4096, 2_599_944_192),
    ("muon_llama_scaling/300m", "llama_300m", 4096, 5_999_951_872),
])
def test_model_flops_match_leaderboard(run, name, seq, tokens):
  """Marin's runs.json model_flops = 3 x fpt x total_tokens (read in place from ../shared)."""
  row = _runs()[run]
  assert flops.param_counts(_model(name, seq))["model_size"] == row["model_size"]
  assert flops.model_flops(_model(name, seq), tokens) == pytest.approx(row["model_flops"], rel=1e-12)


def test_peak_table():
  assert flops.peak_flops("NVIDIA H100 80GB HBM3") == 989.5e12
  assert flops.peak_flops("NVIDIA H100 PCIe") == 756.5e12
  assert flops.peak_flops("TPU v5 lite") == 197e12
  assert flops.peak_flops("TPU v5") == 459e12, "a v5p chip calls itself TPU v5 (libtpu compile-only devices)"
  assert flops.peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
  assert flops.peak_flops("cpu") is None, "CPU peak is unknown: never invent one"
  assert flops.mfu(1e6, 100, "cpu", 1) is None
  assert flops.mfu(1e12, 100, "NVIDIA H200", 2) == pytest.approx(3 * 100 * 1e12 / (2 * 989.5e12))


ONE_DEVICE = lambda: sharding.make_mesh(types.SimpleNamespace(data=1))


def _audit_cfg(loss_impl: str, attention: str = "reference"):
  cfg = config.base()
  m = cfg.model
  m.hidden_dim, m.intermediate_dim, m.num_layers, m.num_heads, m.num_kv_heads = 32, 64, 2, 4, 2
  m.seq_len, m.vocab_size, m.compute_dtype, m.attention, m.attention_block = 128, 512, "float32", attention, 32
  m.loss_impl, m.loss_block_size = loss_impl, 128
  cfg.train.train_batch_size, cfg.train.num_train_steps = 4, 10
  return cfg


@pytest.mark.parametrize("loss_impl,recomputed_head_matmuls", [("fused", 0), ("blockwise", 1)])
def test_audit_counts_every_matmul_of_the_train_step(loss_impl, recomputed_head_matmuls):
  """Hand count of the tiny step's jaxpr: 3 x Marin's forward FLOPs per token minus the 3·S·H softmax FLOPs per layer
  it credits (not matmuls), plus one more [tokens, D] x [D, V] matmul when the blockwise loss recomputes the logits;
  Muon's 5 Newton-Schulz steps on every hidden matrix (m <= n: x x^T, gram^2, gram x = 4m²n + 2m³) apart."""
  cfg = _audit_cfg(loss_impl)
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


def test_audit_counts_the_causal_blocks_of_the_blockwise_attention():
  """Blockwise attention (4 blocks of 32 per row): 7 matmuls per causal (query, key) block pair, 10 pairs of the 16
  a full map has, plus the backward's rowsum(dout * out); the credited full map is 6 per pair of 16."""
  reference = audit.flop_audit(_audit_cfg("fused", "reference"), ONE_DEVICE())
  blockwise = audit.flop_audit(_audit_cfg("fused", "blockwise"), ONE_DEVICE())
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
