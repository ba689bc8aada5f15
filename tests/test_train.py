"""Checkpoints and faults: exact resume, resharding restore, preemption, non-finite guard, bad checkpoints."""
import glob
import os
import signal

import numpy as np
import pytest

from tinyjax import config, errors
from tinyjax.runtime import metrics

STEPS = 12


@pytest.fixture(scope="module")
def make_cfg(small_cfg):
  """The small config with 12 steps, evals every 6 and a Muon LR schedule that moves (decay over 80%)."""
  return lambda **overrides: small_cfg(**{
      "train.num_train_steps": STEPS, "train.steps_per_eval": 6, "train.max_eval_batches": 2,
      "optimizer.learning_rate": 0.02, "optimizer.adam_lr": 0.004, "optimizer.warmup": 0.0, "optimizer.decay": 0.8,
      "optimizer.lr_schedule": "linear", "optimizer.muon_epsilon": 1e-5, **overrides})


@pytest.fixture(scope="module")
def read_metrics(rows, final_sha):
  def read(workdir):
    all_rows = rows(workdir)
    losses = {r["step"]: r["loss"] for r in all_rows if "loss" in r}
    return losses, final_sha(workdir), [r for r in all_rows if "event" in r]
  return read


@pytest.fixture(scope="module")
def uninterrupted(make_cfg, train_run, read_metrics, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("full")
  train_run(make_cfg(), workdir)
  return read_metrics(workdir)


@pytest.mark.slow
def test_resume_is_bitwise_identical(make_cfg, train_run, read_metrics, tmp_path, uninterrupted):
  with pytest.raises(errors.Preempted):
    train_run(make_cfg(), tmp_path, stop_at=6)
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["4", "6"], "SIGTERM must checkpoint at the boundary"
  train_run(make_cfg(), tmp_path)
  losses, sha, events = read_metrics(tmp_path)
  assert losses == uninterrupted[0], "6 steps + resume + 6 steps must log exactly the uninterrupted losses"
  assert sha == uninterrupted[1], "final parameters must be bitwise identical to the uninterrupted run"
  assert [e["event"] for e in events] == ["preempted"]


@pytest.mark.slow
def test_restore_onto_eight_devices(make_cfg, train_run, read_metrics, tmp_path, uninterrupted):
  with pytest.raises(errors.Preempted):
    train_run(make_cfg(), tmp_path, stop_at=6)
  train_run(make_cfg(**{"mesh.data": 8}), tmp_path)  # a 1-device checkpoint restored onto 8 devices
  losses, _, _ = read_metrics(tmp_path)
  assert [losses[s] for s in range(1, 7)] == [uninterrupted[0][s] for s in range(1, 7)]
  # After the restore, 8 devices reduce the bf16 matmuls in another order: equal to bf16 rounding, not bitwise.
  np.testing.assert_allclose([losses[s] for s in range(7, STEPS + 1)],
                             [uninterrupted[0][s] for s in range(7, STEPS + 1)], rtol=1e-3)


@pytest.mark.slow
def test_nan_stops_run_and_is_never_saved(make_cfg, train_run, read_metrics, tmp_path):
  cfg = make_cfg()
  cfg.checkpoint.save_interval_steps = 1
  with pytest.raises(errors.Diverged, match="non-finite loss and grad_norm at step 5; .*last good checkpoint: step 4"):
    train_run(cfg, tmp_path, nan_at=5)
  saved = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit())
  assert max(saved) == 4, f"no checkpoint may be written at or after the bad step, got {saved}"
  _, _, events = read_metrics(tmp_path)
  assert events[-1]["event"] == "diverged" and "step 5" in events[-1]["message"]


@pytest.mark.slow
def test_skip_bad_steps_skips_and_counts(make_cfg, train_run, read_metrics, tmp_path, uninterrupted):
  cfg = make_cfg(**{"train.skip_bad_steps": True})
  train_run(cfg, tmp_path, nan_at=5)
  losses, _, events = read_metrics(tmp_path)
  assert np.isnan(losses[5]) and all(np.isfinite(v) for s, v in losses.items() if s != 5)
  assert [e["event"] for e in events] == ["skipped_bad_steps"] and "1 updates skipped" in events[0]["message"]
  assert losses[4] == uninterrupted[0][4], "steps before the bad one are untouched"
  # The skipped update leaves params as after step 4, so step 6 sees step-5 params of no update: not the same loss.
  assert losses[6] != uninterrupted[0][6]


@pytest.mark.slow
def test_mismatched_checkpoint_names_fields(make_cfg, train_run, tmp_path):
  with pytest.raises(errors.Preempted):
    train_run(make_cfg(), tmp_path, stop_at=2)
  with pytest.raises(config.ConfigError, match=r"model.hidden_dim \(checkpoint 32, config 64\).*"
                                               r"model.intermediate_dim \(checkpoint 64, config 128\)"):
    train_run(make_cfg(**{"model.hidden_dim": 64, "model.intermediate_dim": 128}), tmp_path)


@pytest.mark.slow
def test_corrupted_latest_falls_back(make_cfg, train_run, read_metrics, tmp_path, capsys, uninterrupted):
  with pytest.raises(errors.Preempted):
    train_run(make_cfg(), tmp_path, stop_at=6)
  for path in glob.glob(str(tmp_path / "checkpoints" / "6" / "state" / "**" / "*"), recursive=True):
    if os.path.isfile(path) and "ocdbt" in path or "/d/" in path:
      with open(path, "r+b") as f:
        f.truncate(max(os.path.getsize(path) // 3, 1))
  train_run(make_cfg(), tmp_path)
  out = capsys.readouterr().out
  assert "checkpoint" in out and "unreadable" in out and "resuming from checkpoint at step 4/12" in out
  losses, sha, _ = read_metrics(tmp_path)
  assert losses == uninterrupted[0] and sha == uninterrupted[1], "fallback resume must still be exact"


def test_resume_truncates_metrics_and_drops_torn_line(tmp_path):
  """A resumed run rewrites steps after its checkpoint; a line torn by SIGKILL must not break the resume."""
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1, "loss": 2.0}\n{"step": 4, "loss": 1.5}\n{"step": 5, "loss": 1.4}\n{"step": 6, "lo')
  metrics._truncate(str(path), 4)
  assert path.read_text() == '{"step": 1, "loss": 2.0}\n{"step": 4, "loss": 1.5}\n'


def test_unwritable_workdir_fails_first(make_cfg, train_run, tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  with pytest.raises(config.ConfigError, match="a_file/run' is not a writable directory"):
    train_run(make_cfg(), blocker / "run")


@pytest.mark.slow  # a training subprocess
def test_sigterm_exit_code_and_checkpoint(token_cache, run_program, tmp_path):
  """The real CLI: SIGTERM -> checkpoint at the next step boundary, exit code 75, one line on stderr."""
  proc = run_program("--config=configs/tiny.py", f"--workdir={tmp_path}", f"--config.data.cache_dir={token_cache}",
                     "--config.model.vocab_size=512", "--config.train.log_every=1",
                     "--config.train.num_train_steps=1000", "--config.model.seq_len=32",
                     "--config.train.train_batch_size=4", popen=True)
  for line in proc.stdout:
    if line.startswith("step 3/"):
      proc.send_signal(signal.SIGTERM)
      break
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == errors.EXIT_PREEMPTED, err
  assert err.strip().splitlines()[-1].startswith("tinyjax: stopped by SIGTERM at step ")
  saved = [s for s in os.listdir(tmp_path / "checkpoints") if s.isdigit()]
  assert len(saved) == 1 and int(saved[0]) >= 3
