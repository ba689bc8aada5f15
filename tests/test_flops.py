"""Parameter counts and FLOPs reproduce Marin's published numbers to the last digit; the device peak table."""

import pytest

from tinyjax import config, flops, reference
from tinyjax.model import ModelConfig

# Marin's sizes (experiments/llama.py) with Levanter's counts, bundled in tinyjax/reference/marin_model_table.json:
# shape, params, non-embedding, fwd FLOPs/token @1024, @4096 (vocab 128,256, untied head).
TABLE = reference.load(reference.MODEL_TABLE)["models"]
SHAPE = ("hidden_dim", "intermediate_dim", "num_layers", "num_heads", "num_kv_heads")


def _model(name, seq_len=1024):
  cfg = config.base()
  config.marin_model(cfg, "llama_nano")  # Marin's vocab and untied head; the shape from the table
  for key in SHAPE:
    cfg.model[key] = TABLE[name][key]
  cfg.model.seq_len = seq_len
  return ModelConfig.from_config(cfg.model)


def test_named_sizes_are_the_tables():
  assert len(TABLE) == 8 and set(config.MARIN_MODELS) < set(TABLE)
  for name, shape in config.MARIN_MODELS.items():
    assert shape[:5] == tuple(TABLE[name][k] for k in SHAPE), name


@pytest.mark.parametrize("name", sorted(TABLE))
def test_marin_table(name):
  row = TABLE[name]
  params, non_emb = row["params"], row["non_embedding_params"]
  fpt1024, fpt4096 = row["fwd_flops_per_token_seq1024"], row["fwd_flops_per_token_seq4096"]
  assert _model(name).head_dim == row["head_dim"]
  counts = flops.param_counts(_model(name))
  assert counts["model_size"] == params, "total_trainable_params formula drifted from Levanter's"
  assert counts["non_embedding_params"] == non_emb
  assert flops.flops_per_token(_model(name), 1024) == fpt1024, "lm_flops_per_token drifted from Levanter's"
  assert flops.flops_per_token(_model(name), 4096) == fpt4096


@pytest.fixture(scope="module")
def marin_runs(marin):
  return {r["run_name"]: r for r in reference.load(marin.runs)["runs"]}


@pytest.mark.parametrize("run,name,seq,tokens", [
    ("llama_30m", "llama_30m", 1024, 786_432_000),
    ("llama_75m", "llama_75m", 1024, 3_145_728_000),
    ("muon_llama_scaling/130m", "llama_150m", 4096, 2_599_944_192),
    ("muon_llama_scaling/300m", "llama_300m", 4096, 5_999_951_872),
])
def test_model_flops_match_leaderboard(marin_runs, run, name, seq, tokens):
  """Marin's runs.json model_flops = 3 x fpt x total_tokens (the bundled snapshot of the table)."""
  row = marin_runs[run]
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
