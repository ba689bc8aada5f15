"""Marin's published figures, bundled so that tinyjax runs and tests with nothing beside the checkout.

Figures only (no descriptions, authors or links); each file's `source` names the repository, file, commit and date:
  marin_runs.json          the official leaderboard table, marin-community/speedrun data/runs.json @ dd1d1c17
                           (2025-12-21, 96 rows): compare's offline snapshot
  marin_leaderboard.json   those 96 rows with each run's configuration (batch, seq_len, steps, tokens, optimizer and
                           learning rates, hardware, chips) plus 41 newer runs from marin's experiments/speedrun tree
  llama_50m_muon_1x.speedrun_results.json   one per-run results file in Marin's speedrun_results.json shape
  marin_model_table.json   parameter counts and forward FLOPs/token of experiments/llama.py's sizes (Levanter formulas)
"""
from __future__ import annotations

import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
RUNS = os.path.join(HERE, "marin_runs.json")
LEADERBOARD = os.path.join(HERE, "marin_leaderboard.json")
SPEEDRUN_50M = os.path.join(HERE, "llama_50m_muon_1x.speedrun_results.json")
MODEL_TABLE = os.path.join(HERE, "marin_model_table.json")


def load(path: str) -> dict:
  with open(path) as f:
    return json.load(f)


def snapshot_line(path: str = RUNS) -> str:
  """'marin-community/speedrun data/runs.json @ dd1d1c17 (2025-12-21, 96 runs)': which snapshot a table is."""
  src = load(path)["source"]
  repo = src["repository"].removeprefix("https://github.com/")
  return f"{repo} {src['file']} @ {src['commit'][:8]} ({src['date']}, {src['rows']} runs)"
