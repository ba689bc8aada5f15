"""Faults the audit found (issue 10): an overflowing update never reaches the state or a checkpoint, and a
preempted-then-resumed run logs exactly the rows of an uninterrupted run."""
import math

import pytest

from small_runs import run, small_cfg
from tinyjax import faults, metrics

TIMING = ("training_time", "tokens_per_second", "eta_seconds")


def _rows(workdir):
  """Metric rows without events and wall-clock fields: what must match between two runs."""
  return [{k: v for k, v in r.items() if k not in TIMING} for r in metrics.read(str(workdir)) if "event" not in r]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp("cache"))


def test_overflowing_update_stops_the_run_before_it_is_applied(cache, tmp_path):
  """Finite loss and gradients, but lr 1e39 overflows the parameters: exit-3 path, nothing saved."""
  cfg = small_cfg(cache, **{"optimizer.learning_rate": 1e39, "optimizer.adam_lr": 1e39})
  with pytest.raises(faults.Diverged, match="non-finite parameters or optimizer state after the update at step 1"):
    run(cfg, tmp_path)
  saved = [p.name for p in (tmp_path / "checkpoints").iterdir()] if (tmp_path / "checkpoints").exists() else []
  assert not any(name.isdigit() for name in saved), "no checkpoint may hold the overflowed state"


def test_skipped_overflowing_updates_keep_the_state_finite(cache, tmp_path):
  cfg = small_cfg(cache, **{"optimizer.learning_rate": 1e39, "optimizer.adam_lr": 1e39,
                            "train.skip_bad_steps": True})
  run(cfg, tmp_path)
  rows = [r for r in metrics.read(str(tmp_path)) if "loss" in r and "event" not in r]
  assert rows[-1]["bad_steps"] == 8, "every update overflowed and was skipped"
  assert all(math.isfinite(r["param_norm"]) for r in rows)
  assert len({round(r["param_norm"], 6) for r in rows}) == 1, "no update was applied"
  events = [r for r in metrics.read(str(tmp_path)) if r.get("event") == "skipped_bad_steps"]
  assert events and "parameters or optimizer state" in events[0]["message"]


@pytest.mark.parametrize("log_every", [1, 5])
def test_preempted_run_resumes_to_the_uninterrupted_rows(cache, tmp_path, log_every):
  full, cut = tmp_path / "full", tmp_path / "cut"
  run(small_cfg(cache, **{"train.log_every": log_every}), full)
  with pytest.raises(faults.Preempted):
    run(small_cfg(cache, **{"train.log_every": log_every}), cut, sigterm_at=5)
  run(small_cfg(cache, **{"train.log_every": log_every}), cut)
  assert _rows(cut) == _rows(full), "a resumed run's metrics.jsonl must equal an uninterrupted run's, row for row"
