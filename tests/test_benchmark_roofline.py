"""tinyjax/benchmarks/roofline.py: Marin's measured runs it holds the roofline against, and its tables."""
import json

import pytest

from tinyjax.benchmarks import roofline as bench


def test_marin_measured_runs_are_the_leaderboard_figures_with_their_provenance():
  with open(bench.MARIN) as f:
    data = json.load(f)
  assert data["source"]["commit"] == "8c942e9bec3ca65aef8f60fc4b213a2d16d7ac81"
  runs = {r["run_name"]: r for r in data["runs"]}
  assert set(runs) == {"llama_50m_muon_1x", "llama_50m_h200", "parallel_llama/130m", "llama_30m", "llama_75m"}
  muon = runs["llama_50m_muon_1x"]
  assert (muon["hardware"], muon["num_chips"], muon["num_train_steps"]) == ("1x H200", 1, 7629)
  assert muon["training_time_s"] / muon["num_train_steps"] == pytest.approx(0.154545, abs=1e-6)
  assert runs["parallel_llama/130m"]["tinyjax"] == {"config": "c4_130m", "target": "v5p-32", "overrides": []}
  assert runs["llama_30m"]["num_chips"] == 64 and "--config.train.train_batch_size=512" in \
      runs["llama_30m"]["tinyjax"]["overrides"]


def test_tables_show_the_ratios():
  cpu = [{"config": "tiny", "bound_s": 0.2, "measured_s": 0.1, "measured_over_bound": 0.5, "hbm_gb": 1.85,
          "gflops": 22.7, "by_part": {"loss": 0.15}}]
  marin = [{"run": "llama_50m_muon_1x", "hardware": "1x H200", "tinyjax": "c4_50m on h200", "marin_step_s": 0.1545,
            "bound_s": 0.067, "bound_over_marin": 0.4337, "mfu_ceiling": 0.33, "marin_tokens_per_s": 848e3,
            "tokens_per_s_bound": 1.95e6}]
  lines = bench.tables(cpu, marin).splitlines()
  assert lines[2] == "| tiny | 200 | 100 | 0.50 | 1.85 | 22.7 | 0.15 |"
  assert lines[-1] == "| llama_50m_muon_1x | 1x H200 | c4_50m on h200 | 154.5 | 67.0 | 0.43 | 0.330 | 848k | 1,950k |"
