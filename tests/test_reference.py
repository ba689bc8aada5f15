"""The Marin figures bundled in tinyjax/reference/: which they are (counts and a few exact values), where each file
came from, that the two leaderboard files agree, and that they hold figures, not Marin's prose."""
import json
import os

import pytest

from tinyjax import reference

FILES = (reference.RUNS, reference.LEADERBOARD, reference.SPEEDRUN_50M, reference.MODEL_TABLE)


@pytest.mark.parametrize("path", FILES, ids=os.path.basename)
def test_every_file_names_its_source(path):
  src = reference.load(path)["source"]
  sources = [src[k] for k in ("official_rows", "configs_and_newer_rows")] if "official_rows" in src else [src]
  for s in sources:
    assert s["repository"].startswith("https://github.com/") and s["file"] and s["commit"] and s["date"][:2] == "20"


def test_the_leaderboard_table():
  doc = reference.load(reference.RUNS)
  assert reference.snapshot_line() == "marin-community/speedrun data/runs.json @ dd1d1c17 (2025-12-21, 96 runs)"
  rows = {r["run_name"]: r for r in doc["runs"]}
  assert len(doc["runs"]) == len(rows) == doc["source"]["rows"] == 96
  assert rows["llama_50m_h200"]["eval_paloma_c4_en_bpb"] == 1.403206706047058
  assert rows["muon_llama_scaling/130m"]["model_flops"] == 1.777337490915459e18
  assert rows["llama_30m"]["training_time"] == 111.63192389399967


def test_the_enriched_leaderboard_agrees_with_the_table():
  table = {r["run_name"]: r for r in reference.load(reference.RUNS)["runs"]}
  doc = reference.load(reference.LEADERBOARD)
  official = [r for r in doc["runs"] if r["in_official_leaderboard_runs_json"]]
  assert (len(doc["runs"]), len(official)) == (137, 96) and {r["run_name"] for r in official} == set(table)
  for r in official:
    t = table[r["run_name"]]
    assert [r[k] for k in ("model_size", "model_flops", "training_hardware_flops", "eval_paloma_c4_en_bpb")] == \
        [t[k] for k in ("model_size", "model_flops", "training_hardware_flops", "eval_paloma_c4_en_bpb")]
    assert r["training_time_s"] == t["training_time"]
  h200 = next(r for r in doc["runs"] if r["run_name"] == "llama_50m_h200")
  assert (h200["total_tokens"], h200["train_batch_size"], h200["seq_len"], h200["num_train_steps"]) == (
      996_147_200, 128, 1024, 7600)
  assert (h200["hardware"], h200["num_chips"], h200["optimizer"], h200["learning_rate"]) == ("1x H200", 1, "adam", 0.003)
  muon = next(r for r in doc["runs"] if r["run_name"] == "llama_50m_muon_1x")
  assert (muon["learning_rate"], muon["adam_lr"], muon["eval_paloma_c4_en_bpb"]) == (0.02, 0.004, 1.398867130279541)


def test_the_per_run_file_and_the_model_table():
  [run] = reference.load(reference.SPEEDRUN_50M)["runs"]
  info = run["run_info"]
  assert (info["model_size"], info["total_tokens"], info["training_time"]) == (50_874_048, 999_948_288,
                                                                              1179.0270681492984)
  assert info["train_config"]["optimizer_config"]["adam_lr"] == 0.004
  table = reference.load(reference.MODEL_TABLE)["models"]
  assert len(table) == 8 and table["llama_50m"]["params"] == info["model_size"]
  assert table["llama_1_4b"]["fwd_flops_per_token_seq4096"] == 2_877_292_544


@pytest.mark.parametrize("path", FILES, ids=os.path.basename)
def test_figures_not_prose(path):
  """No descriptions, authors or links from Marin's files; any text value is a name, a short label or a path (the longest: a hardware label of 8 words)."""
  text = []

  def walk(x, key=""):
    if isinstance(x, dict):
      for k, v in x.items():
        assert k not in ("description", "author", "wandb_link", "notes"), (path, k)
        if k != "source":
          walk(v, k)
    elif isinstance(x, list):
      for v in x:
        walk(v, key)
    elif isinstance(x, str):
      text.append((key, x))
  walk(reference.load(path))
  long = [(k, v) for k, v in text if len(v.split()) > 8]
  assert long == [], long[:3]


def test_packaged(repo):
  """pyproject ships the data files with the package (a wheel install has them too)."""
  with open(os.path.join(repo, "pyproject.toml")) as f:
    assert '"tinyjax.reference" = ["*.json"]' in f.read()
  assert sorted(f for f in os.listdir(reference.HERE) if f.endswith(".json")) == sorted(map(os.path.basename, FILES))
  json.dumps(reference.load(reference.LEADERBOARD), allow_nan=False)  # plain JSON: no NaN/Infinity
