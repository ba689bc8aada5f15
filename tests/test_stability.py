"""The stability finder: LR-sensitivity and boundary math, recommendation, divergence detection, names, one real sweep."""
import json
import os

import pytest

from tinyjax import stability

def rec(lr, final, status="completed", initial=7.0, step=None, quantity=None):
  div = {"step": step, "quantity": quantity, "message": ""} if status == "diverged" else None
  return {"setting": "s", "lr": lr, "status": status, "initial_loss": initial, "final_loss": final,
          "last_step": step or 100, "num_train_steps": 100, "divergence": div, "overrides": []}


def test_sensitivity_boundary_and_recommendation_exact():
  records = [rec(1e-1, 9.0, "diverged", step=30, quantity="loss-blowup"),  # listed out of order on purpose
             rec(1e-3, 5.0), rec(3e-3, 4.0), rec(1e-2, 3.0), rec(3e-2, 7.5),  # 7.5 > initial: counts as 7.0
             rec(3e-1, float("nan"), "diverged", step=4, quantity="non-finite loss")]
  s = stability.summarize(records, safety=0.5)["settings"][0]
  assert [r["lr"] for r in s["runs"]] == [1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1]
  assert [r["capped_loss"] for r in s["runs"]] == [5.0, 4.0, 3.0, 7.0, 7.0, 7.0]
  assert s["best_loss"] == 3.0 and s["best_lr"] == 1e-2
  # Wortsman et al.: mean of min(final, initial) over the grid minus the best: (5+4+3+7+7+7)/6 - 3
  assert s["lr_sensitivity"] == pytest.approx(33 / 6 - 3, abs=1e-12)
  assert s["boundary"] == {"lr": 1e-1, "step": 30, "quantity": "loss-blowup"}, "the smallest diverged LR"
  assert s["recommended_lr"] == 3e-2, "largest completed LR <= 0.5 x boundary (0.05)"


def test_recommendation_margin_and_no_boundary():
  records = [rec(1e-3, 5.0), rec(1e-2, 4.0), rec(2e-2, 3.9), rec(3e-2, 6.0, "diverged", step=9, quantity="x"),
             rec(1e-1, 3.5)]  # non-monotonic: a completed LR above the boundary is never recommended
  s = stability.summarize(records, safety=0.5)["settings"][0]
  assert s["boundary"]["lr"] == 3e-2 and s["recommended_lr"] == 1e-2, "2e-2 > 0.5 x 3e-2 = 1.5e-2"
  assert stability.summarize(records, safety=1.0)["settings"][0]["recommended_lr"] == 2e-2
  s = stability.summarize([rec(1e-3, 5.0), rec(1e-2, 4.0)])["settings"][0]
  assert s["boundary"] is None and s["recommended_lr"] == 1e-2 and s["lr_sensitivity"] == pytest.approx(0.5)
  s = stability.summarize([rec(1e-2, 6.0, "diverged", step=2, quantity="x")])["settings"][0]
  assert s["recommended_lr"] is None and s["lr_sensitivity"] == 0.0


def test_run_that_never_logged_a_loss_counts_as_the_settings_initial_loss():
  records = [rec(1e-3, 5.0, initial=7.0), rec(1e-2, 4.0, initial=7.2),
             rec(1.0, None, "diverged", initial=None, step=1, quantity="non-finite loss")]
  s = stability.summarize(records)["settings"][0]
  assert s["runs"][-1]["capped_loss"] == 7.2, "median of the setting's known initial losses"


def write_rows(workdir, rows):
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
    f.write('{"step": 99, "loss": 1')  # a line torn by a kill is ignored


def test_divergence_from_fake_metrics(tmp_path):
  rows = [{"step": 1, "loss": 6.0}, {"step": 5, "loss": 7.5}, {"step": 20, "loss": 6.9}, {"step": 30, "loss": 7.1},
          {"step": 40, "loss": 9.0}]
  write_rows(tmp_path, rows)
  read = stability.metrics.read(str(tmp_path))
  # 7.5 at step 5 is inside the first 10% of 100 steps (warmup noise); 7.1 > 6 + 1 at step 30 is the first blow-up
  assert stability.blowup(read, 100, 1.0, 0.1) == {
      "step": 30, "quantity": "loss-blowup", "message": "loss 7.1000 > initial 6.0000 + 1.0 nats at step 30"}
  assert stability.blowup(read, 100, 2.5, 0.1)["step"] == 40
  assert stability.blowup(read, 100, 5.0, 0.1) is None
  assert stability.nonfinite(read) is None
  event = {"step": 8, "event": "diverged", "message": "non-finite grad_norm at step 7; last good checkpoint: None"}
  write_rows(tmp_path, [{"step": 1, "loss": 6.0}, {"step": 4, "loss": 5.5}, event])
  read = stability.metrics.read(str(tmp_path))
  assert stability.nonfinite(read)["step"] == 7 and stability.nonfinite(read)["quantity"] == "non-finite grad_norm"
  assert stability.blowup(read, 100, 1.0, 0.0) is None, "event rows are not losses"


def test_tail_reads_only_whole_new_lines(tmp_path):
  path = str(tmp_path / "metrics.jsonl")
  tail = stability.Tail(path)
  assert tail.read() == [], "no file yet: the run is still starting"
  with open(path, "w") as f:
    f.write('{"step": 1, "loss": 6.0}\n{"step": 4, "lo')
  assert tail.read() == [{"step": 1, "loss": 6.0}]
  with open(path, "a") as f:
    f.write('ss": 5.5}\n')
  assert tail.read() == [{"step": 1, "loss": 6.0}, {"step": 4, "loss": 5.5}], "the torn line, once whole"


def test_finished_runs_are_skipped_and_unfinished_are_not(tmp_path):
  run = stability.Run("base", 0.01, str(tmp_path / "r"), ())
  write_rows(run.workdir, [{"step": 1, "loss": 6.0}, {"step": 8, "loss": 5.0}])
  info = lambda status: json.dump({"status": status, "num_train_steps": 8},
                                  open(os.path.join(run.workdir, "run_info.json"), "w"))
  info("preempted")
  assert stability.finished(run) is None, "a stopped run without a recorded divergence runs again"
  info("completed")
  r = stability.finished(run)
  assert (r["status"], r["initial_loss"], r["final_loss"], r["last_step"]) == ("completed", 6.0, 5.0, 8)


def test_names_are_deterministic_and_filesystem_safe(tmp_path):
  varies = stability.parse_vary(["model.use_qk_norm=True,False", "train.z_loss_weight=0,1e-4"])
  assert stability.settings(varies) == [
      {"model.use_qk_norm": "True", "train.z_loss_weight": "0"},
      {"model.use_qk_norm": "True", "train.z_loss_weight": "1e-4"},
      {"model.use_qk_norm": "False", "train.z_loss_weight": "0"},
      {"model.use_qk_norm": "False", "train.z_loss_weight": "1e-4"}]
  name = stability.run_name({"model.use_qk_norm": "True", "data.train_urls": "a/b c"}, 3e-4)
  assert name == "use_qk_norm-True_train_urls-a_b_c_lr-0.0003"  # the launchers' one naming rule
  assert stability.run_name({}, 1e-2) == "lr-0.01" and stability.setting_name({}) == "base"
  runs = stability.plan_runs(str(tmp_path), [1e-3, 2e-2], varies[:1], ["train.log_every=2"], 50, 0.2)
  assert [os.path.basename(r.workdir) for r in runs] == [
      "use_qk_norm-True_lr-0.001", "use_qk_norm-True_lr-0.02", "use_qk_norm-False_lr-0.001",
      "use_qk_norm-False_lr-0.02"]
  assert runs[1].overrides == ("train.log_every=2", "train.num_train_steps=50", "model.use_qk_norm=True",
                               "optimizer.learning_rate=0.02", "optimizer.adam_lr=0.004"), "Muon/Adam ratio 0.2"


def test_plot_writes_png(tmp_path):
  records = [rec(1e-3, 5.0), rec(1e-2, 4.0), rec(1e-1, 8.0, "diverged", step=3, quantity="loss-blowup")]
  out = str(tmp_path / "lr.png")
  stability.plot_lr(stability.summarize(records), out)
  with open(out, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def cli_run(run_program):
  """python -m tinyjax.stability in a user's environment (child_env: one CPU device)."""
  return lambda *args: run_program(*args, module="tinyjax.stability")


@pytest.mark.parametrize("args,message", [
    (["--lrs", "1e-3,x"], "--lrs='1e-3,x': expected comma-separated numbers"),
    (["--lrs", "0,1e-3"], "every learning rate must be a finite number > 0"),
    (["--lrs", "1e-3", "--vary", "model.use_qk_norm"], "expected KEY=V1,V2"),
    (["--lrs", "1e-3", "--vary", "model.nope=1,2"], "unknown config key config.model.nope"),
    ([], "--lrs is required"),
])
def test_user_mistakes_are_one_line_exit_2(tmp_path, args, message, capsys):
  """In-process (stability.main is what `python -m tinyjax.stability` runs): the CLI's one-line stop."""
  with pytest.raises(SystemExit) as e:
    stability.main(["--config=configs/stability_tiny.py", f"--workdir-root={tmp_path}", *args])
  err = capsys.readouterr().err
  assert e.value.code == 2 and err.startswith("tinyjax: error: ") and message in err, err
  assert not os.listdir(tmp_path), "nothing runs before the arguments are checked"


@pytest.mark.slow
def test_end_to_end_stops_the_diverged_run(cli_run, tmp_path):
  """Two real runs (tiny shapes, 60 steps): AdamW at lr 1e-3 trains; at 10 it blows up and is stopped early."""
  args = ["--config=configs/stability_tiny.py", "--lrs", "1e-3,10", "--steps", "60", f"--workdir-root={tmp_path}",
          "--set", "model.hidden_dim=32", "--set", "model.intermediate_dim=64", "--set", "train.log_every=2"]
  stale = tmp_path / "lr-0.001"  # an unfinished earlier attempt: its rows must not be read as this run's
  write_rows(str(stale), [{"step": 1, "loss": 0.5}])
  r = cli_run(*args)
  assert r.returncode == 0, r.stderr[-2000:]
  summary = json.load(open(tmp_path / "stability_summary.json"))
  (s,) = summary["settings"]
  good, bad = s["runs"]
  assert good["lr"] == 1e-3 and good["status"] == "completed" and good["last_step"] == 60
  assert good["final_loss"] < good["initial_loss"] and good["initial_loss"] > 5, "the stale row was discarded"
  assert bad["lr"] == 10 and bad["status"] == "diverged" and bad["last_step"] < 60, "stopped before the end"
  assert s["boundary"]["lr"] == 10 and s["boundary"]["quantity"] in ("loss-blowup", "non-finite loss",
                                                                     "non-finite grad_norm")
  assert s["recommended_lr"] == 1e-3 and s["lr_sensitivity"] == pytest.approx(
      (good["final_loss"] + bad["initial_loss"]) / 2 - good["final_loss"])
  assert "boundary lr 10" in r.stdout and os.path.exists(tmp_path / "lr_sensitivity.png")
  csv_lines = open(tmp_path / "stability_summary.csv").read().splitlines()
  assert len(csv_lines) == 3 and ",diverged," in csv_lines[2]
  again = cli_run(*args)  # a rerun finds both runs finished and trains nothing
  assert again.returncode == 0 and again.stdout.count("done earlier") == 2, again.stdout
