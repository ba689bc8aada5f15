"""Parameter counts and FLOPs reproduce Marin's published numbers to the last digit; the device peak table."""
import json
import os

import pytest

from tinyjax import config, flops
from tinyjax.model import ModelConfig

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


@pytest.fixture(scope="module")
def marin_runs(shared):
  with open(os.path.join(shared, "marin", "runs.json")) as f:
    return {r["run_name"]: r for r in json.load(f)}


@pytest.mark.parametrize("run,name,seq,tokens", [
    ("llama_30m", "llama_30m", 1024, 786_432_000),
    ("llama_75m", "llama_75m", 1024, 3_145_728_000),
    ("muon_llama_scaling/130m", "llama_150m", 4096, 2_599_944_192),
    ("muon_llama_scaling/300m", "llama_300m", 4096, 5_999_951_872),
])
def test_model_flops_match_leaderboard(marin_runs, run, name, seq, tokens):
  """Marin's runs.json model_flops = 3 x fpt x total_tokens (read in place from ../shared)."""
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
