"""Sweeps: the shipped grids and their workdir names, --launch print/local/tpu/slurm, skip-finished, the report, and
one real 2-point tiny sweep end to end (slow)."""
import csv
import json
import os
import shlex
import sys

import matplotlib.image
import pytest

from tinyjax import errors, sweep
from tinyjax.launch import commands

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWEEPS = os.path.join(ROOT, "configs", "sweeps")


@pytest.fixture(autouse=True)
def compiles(monkeypatch):
  """The preflight's per-point compiles (tinyjax/aot.py) answered from the point's batch: 16 rows per chip and more
  do not fit (a stand-in for the child-process compile; tests/test_targets.py covers the real one)."""
  from tinyjax import aot  # noqa: PLC0415
  seen = []

  def plan(cfg, target, search=True):
    seen.append((target.name, cfg.train.train_batch_size))
    rows = cfg.train.train_batch_size // target.chips
    return {"fits": rows < 16, "peak_gib": float(rows), "usable_gib": 15.9, "chips": target.chips}
  monkeypatch.setattr(aot, "plan", plan)
  return seen


def _points(name):
  return sweep.expand(sweep.load(os.path.join(SWEEPS, f"{name}.py")))


def test_batch_size_grid():
  s = sweep.load(os.path.join(SWEEPS, "batch_size.py"))
  points = sweep.expand(s)
  assert len(points) == 5 * 2 * 2 and len({p.name for p in points}) == 20
  assert [p.name for p in points[:4]] == [
      "train_batch_size-16_lr_scaling_base_batch-0_warmup-0.0",
      "train_batch_size-16_lr_scaling_base_batch-0_warmup-0.05",
      "train_batch_size-16_lr_scaling_base_batch-128_warmup-0.0",
      "train_batch_size-16_lr_scaling_base_batch-128_warmup-0.05"]
  assert {p.axis_values["train.train_batch_size"] for p in points} == {16, 32, 64, 128, 256}
  assert sweep.main_args(sweep.config_path(s, points[-1]), "gs://b/sw", points[-1]) == [
      "--config=configs/c4_50m.py", "--config.train.chinchilla_multiple=2.0", "--config.train.eval_batch_size=128",
      "--config.train.train_batch_size=256",
      "--config.optimizer.lr_scaling_base_batch=128", "--config.optimizer.warmup=0.05",
      "--workdir=gs://b/sw/train_batch_size-256_lr_scaling_base_batch-128_warmup-0.05"]


def test_model_size_grid_switches_the_base_config():
  s = sweep.load(os.path.join(SWEEPS, "model_size.py"))
  points = sweep.expand(s)
  assert len(points) == 15
  assert points[0].name == "c4_30m_chinchilla_multiple-0.25" and points[-1].name == "c4_75m_chinchilla_multiple-4.0"
  assert sweep.main_args(sweep.config_path(s, points[7]), "/r", points[7]) == [
      "--config=configs/c4_50m.py", "--config.train.chinchilla_multiple=1.0",
      "--workdir=/r/c4_50m_chinchilla_multiple-1.0"]


def test_tiny_scaling_grid():
  names = [p.name for p in _points("tiny_scaling")]
  assert names[0] == "hidden_dim-64_intermediate_dim-224_num_train_steps-20" and len(names) == 6
  assert names[-1] == "hidden_dim-128_intermediate_dim-448_num_train_steps-80"


def test_names_are_filesystem_safe_and_collisions_rejected(tmp_path, capsys):
  assert commands.run_name({"data.train_urls": "hf://a b/c*", "x": 1}) == "train_urls-hf___a_b_c__x-1"  # sweep's rule
  bad = tmp_path / "dup.py"
  bad.write_text("def get_sweep():\n  return {'config': 'configs/tiny.py', 'axes': "
                 "[[{'train.seed': 1}, {'model.seed': 1}]]}\n")
  with pytest.raises(SystemExit) as e:
    sweep.expand(sweep.load(str(bad)))
  assert e.value.code == 2 and "share a workdir name (seed-1)" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["nope.py"], "nope.py: no such sweep file"),
    ([os.path.join(SWEEPS, "tiny.py"), "--launch", "tpu"], "--launch tpu needs the launcher's flags after --"),
    ([os.path.join(SWEEPS, "tiny.py"), "--launch", "ssh"], "invalid choice: 'ssh'"),
])
def test_user_mistakes_exit_2(argv, message, capsys):
  with pytest.raises(SystemExit) as e:
    sweep.main(argv)
  err = capsys.readouterr().err.strip()
  assert e.value.code == 2 and len(err.splitlines()) == 1 and message in err


def _finish(path, status="completed", results=True):
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "run_info.json"), "w") as f:
    json.dump({"status": status}, f)
  if results:
    with open(os.path.join(path, "speedrun_results.json"), "w") as f:
      json.dump({"runs": []}, f)


def test_status_of_workdirs(tmp_path):
  assert sweep.status(str(tmp_path / "none")) == "new"
  _finish(tmp_path / "a")
  _finish(tmp_path / "b", status="running")
  _finish(tmp_path / "c", results=False)
  _finish(tmp_path / "d", status="preempted")
  assert [sweep.status(str(tmp_path / n)) for n in "abcd"] == ["completed", "running", "incomplete", "preempted"]


def test_launch_print_marks_finished_points(tmp_path, capsys):
  points = _points("tiny")
  _finish(tmp_path / points[1].name)
  assert sweep.main([os.path.join(SWEEPS, "tiny.py"), "--launch", "print", "--root", str(tmp_path)]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert len(lines) == 6 and lines[1].startswith("# done: python -m tinyjax.main --config=configs/tiny.py")
  assert lines[0] == ("python -m tinyjax.main --config=configs/tiny.py --config.train.log_every=10 "
                      "--config.train.steps_per_eval=10 --config.train.eval_batch_size=16 --config.train.max_eval_batches=4 "
                      "'--config.train.sample_prompts=()' "
                      "--config.train.train_batch_size=4 --config.train.num_train_steps=80 "
                      f"--config.optimizer.lr_scaling_base_batch=0 --workdir={tmp_path}/{points[0].name}")
  assert points[0].name == "train_batch_size-4_num_train_steps-80_lr_scaling_base_batch-0"


def test_launch_local_skips_finished_and_stops_on_preemption(tmp_path, monkeypatch):
  points, calls = _points("tiny"), []
  _finish(tmp_path / points[0].name)
  _finish(tmp_path / points[2].name, status="preempted")  # interrupted: rerun, main resumes it
  rcs = iter([0, 75])
  monkeypatch.setattr(sweep.subprocess, "call", lambda argv: calls.append(argv) or next(rcs))
  assert sweep.main([os.path.join(SWEEPS, "tiny.py"), "--launch", "local", "--root", str(tmp_path)]) == 75
  assert [c[-1] for c in calls] == [f"--workdir={tmp_path}/{p.name}" for p in points[1:3]]  # 4th+ never started
  assert calls[0][:4] == [sys.executable, "-m", "tinyjax.main", f"--config={ROOT}/configs/tiny.py"]


def test_arguments_after_double_dash_reach_every_point(tmp_path, monkeypatch, capsys):
  """`-- --config.data.cache_dir=DIR` goes to every point's tinyjax.main (local, print; tpu/slurm after a second --);
  overriding a key the sweep sets, or anything but --config.KEY=VALUE, is one line and exit 2."""
  f, calls = os.path.join(SWEEPS, "tiny.py"), []
  monkeypatch.setattr(sweep.subprocess, "call", lambda argv: calls.append(argv) or 0)
  extra = [f"--config.data.cache_dir={tmp_path / 'cache'}", "--config.train.seed=3"]
  assert sweep.main([f, "--launch", "local", "--root", str(tmp_path), "--", *extra]) == 0
  assert len(calls) == 6 and all(c[-3:-1] == extra for c in calls)
  assert [c[-1] for c in calls] == [f"--workdir={tmp_path}/{p.name}" for p in _points("tiny")]
  assert sweep.main([f, "--launch", "print", "--root", str(tmp_path), "--", *extra]) == 0
  printed = capsys.readouterr().out.splitlines()
  assert all(shlex.split(line)[-3:-1] == extra for line in printed[-6:])
  assert sweep.main([f, "--launch", "tpu", "--dry-run", "--root", "gs://b/t", "--", "--name=tj", "--zone=z",
                     "--repo=https://example.com/t.git", "--", extra[0]]) == 0
  runs = [line for line in capsys.readouterr().out.splitlines() if "tinyjax.main" in line]
  assert len(runs) == 6 and all(extra[0] in line for line in runs)
  for bad, message in ((["--config.train.train_batch_size=2"], "config.train.train_batch_size is set by the sweep"),
                       (["--workdir=/x"], "only --config.KEY=VALUE overrides"),
                       (["--config=configs/c4_50m.py"], "only --config.KEY=VALUE overrides")):
    with pytest.raises(SystemExit) as e:
      sweep.main([f, "--launch", "local", "--root", str(tmp_path), "--", *bad])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and message in err, err
  with pytest.raises(SystemExit):
    sweep.main([f, "--report", "--root", str(tmp_path), "--", extra[0]])
  assert "--report alone launches nothing" in capsys.readouterr().err
  assert len(calls) == 6, "a refused sweep starts nothing"


def test_no_ready_tpu_vm_stops_the_sweep(tmp_path, monkeypatch):
  from tinyjax.launch import tpu  # noqa: PLC0415
  launched = []
  monkeypatch.setattr(tpu, "main", lambda argv: launched.append(argv) or errors.EXIT_NOT_READY)
  rc = sweep.main([os.path.join(SWEEPS, "tiny.py"), "--launch", "tpu", "--root", "gs://b/t", "--", "--name=tj",
                   "--zone=z", "--repo=r"])
  assert rc == 69 and len(launched) == 1, "later points would wait for the same capacity"


def test_launch_tpu_and_slurm_dry_run(tmp_path, capsys):
  f = os.path.join(SWEEPS, "tiny.py")
  assert sweep.main([f, "--launch", "tpu", "--dry-run", "--root", "gs://b/t", "--", "--name=tj", "--zone=z",
                     "--repo=https://example.com/t.git"]) == 0
  out = capsys.readouterr().out
  runs = [line for line in out.splitlines() if "tinyjax.main" in line]
  assert len(runs) == 6 and all("--worker=all" in line for line in runs)
  assert "--workdir=gs://b/t/train_batch_size-16_num_train_steps-20_lr_scaling_base_batch-16" in runs[-1]
  assert sweep.main([f, "--launch", "slurm", "--dry-run", "--root", str(tmp_path), "--", "--nodes=2"]) == 0
  out = capsys.readouterr().out
  assert out.count("#SBATCH --requeue") == 6 and out.count("#SBATCH --nodes=2") == 6
  assert "#SBATCH --job-name=tiny-train_batch_size-8_num_train_steps-40_lr_scaling_base_batch-16" in out


def _eval_steps(overrides: dict) -> list[int]:
  """The steps a point evaluates at, as train.py decides: every steps_per_eval steps and at the end."""
  steps, every = overrides["train.num_train_steps"], overrides.get("train.steps_per_eval", 1000)
  return [s for s in range(1, steps + 1) if s % every == 0 or s == steps]


def _fake_sweep(tmp_path, make_workdir):
  """The tiny grid's six points as finished workdirs with made-up BPBs, evaluated at the steps the sweep's own
  config makes the trainer evaluate at (make_workdir spaces evals evenly: the same steps here)."""
  points = _points("tiny")
  bpb = {(4, 0): 2.50, (4, 16): 2.45, (8, 0): 2.30, (8, 16): 2.40, (16, 0): 2.25, (16, 16): 2.25}
  for p in points:
    b, base = p.axis_values["train.train_batch_size"], p.axis_values["optimizer.lr_scaling_base_batch"]
    n = len(_eval_steps(p.overrides))

    def edit(cfg, b=b, base=base):
      cfg.train.train_batch_size, cfg.optimizer.lr_scaling_base_batch, cfg.train.num_train_steps = b, base, 320 // b
    make_workdir(tmp_path / p.name, "tiny", edit=edit,
                 evals={"python_docs": [bpb[b, base] + 0.1 * (n - 1 - i) for i in range(n)]},
                 extra_info={"status": "completed"})
  return points


def test_tiny_sweep_curves_figure_draws_curves_clear_of_the_legend(tmp_path, make_workdir):
  """curves.png of configs/sweeps/tiny.py: every run's BPB is a curve over several token counts (the points train
  equal tokens, so final evals alone would stack at one x), and no drawn point lies under the legend."""
  from tinyjax import plot  # noqa: PLC0415
  points = _fake_sweep(tmp_path, make_workdir)
  assert [len(_eval_steps(p.overrides)) for p in points] == [8, 8, 4, 4, 2, 2]
  spec = next(f for f in sweep.load(os.path.join(SWEEPS, "tiny.py"))["figures"] if f["kind"] == "curves")
  fig = plot.figure([plot.Run(str(tmp_path / p.name)) for p in points], "curves", axis=spec["x"])
  fig.canvas.draw()
  ax_loss, ax_bpb = fig.axes
  bpb_x = {line.get_label(): sorted(set(line.get_xdata())) for line in ax_bpb.get_lines()}
  per_point = {4: [5120 * k for k in range(1, 9)], 8: [10240 * k for k in range(1, 5)], 16: [20480, 40960]}
  assert bpb_x == {f"{p.name} (python_docs)": per_point[p.axis_values["train.train_batch_size"]] for p in points}
  assert {max(line.get_xdata()) for line in ax_loss.get_lines()} == {40960}  # equal tokens: every run ends here
  [legend] = fig.legends
  box = legend.get_window_extent()
  assert [t.get_text() for t in legend.get_texts()] == [p.name for p in points]
  for ax in (ax_loss, ax_bpb):
    assert not box.overlaps(ax.get_window_extent()), "the legend sits outside both panels"
    for line in ax.get_lines():
      xy = ax.transData.transform(line.get_xydata())
      assert not any(box.contains(x, y) for x, y in xy), f"{line.get_label()}: a point under the legend"
  plot.plt.close(fig)


def test_report_table_and_figures(tmp_path, make_workdir, capsys):
  points = _fake_sweep(tmp_path, make_workdir)
  info_path = tmp_path / points[-1].name / "run_info.json"
  info_path.write_text(json.dumps({**json.loads(info_path.read_text()), "status": "preempted"}))
  assert sweep.main([os.path.join(SWEEPS, "tiny.py"), "--report", "--root", str(tmp_path)]) == 0
  out = capsys.readouterr().out
  with open(tmp_path / "report.csv") as f:
    rows = list(csv.DictReader(f))
  assert [(r["train.train_batch_size"], r["optimizer.lr_scaling_base_batch"], r["bpb"]) for r in rows] == [
      ("4", "0", "2.5000"), ("4", "16", "2.4500"), ("8", "0", "2.3000"), ("8", "16", "2.4000"),
      ("16", "0", "2.2500"), ("16", "16", "2.2500")]
  assert [r["status"] for r in rows] == ["completed"] * 5 + ["preempted"]  # in the table, not in the figures
  assert [r["completed_steps"] for r in rows] == ["80", "80", "40", "40", "20", "20"]
  assert {r["total_tokens"] for r in rows} == {str(320 * 128)}
  assert {r["eval_set"] for r in rows} == {"python_docs"}
  assert "train_batch_size-16_num_train_steps-20_lr_scaling_base_batch-16  16" in out  # the console table
  for kind in ("batch", "curves"):
    path = tmp_path / f"{kind}.png"
    assert path.stat().st_size > 15 * 1024 and matplotlib.image.imread(path).shape[0] > 300


@pytest.mark.slow
def test_tiny_sweep_end_to_end(tmp_path, run_program):
  """Two real points x 6 steps: run, rerun (both skipped), report."""
  sweep_file = tmp_path / "two.py"
  sweep_file.write_text(
      "def get_sweep():\n"
      f"  return {{'config': {os.path.join(ROOT, 'configs', 'tiny.py')!r},\n"
      "          'fixed': {'train.num_train_steps': 6, 'train.steps_per_eval': 6, 'train.log_every': 2,\n"
      "                    'train.max_eval_batches': 1, 'train.sample_prompts': '()'},\n"
      "          'axes': [[{'train.train_batch_size': 4}, {'train.train_batch_size': 8}]],\n"
      "          'figures': [{'kind': 'batch', 'group_by': 'optimizer.name'},\n"
      "                      {'kind': 'scaling', 'group_by': 'model_size', 'x': 'tokens'}]}\n")
  args = [sweep_file, "--root", tmp_path / "runs"]  # child_env: the runs do not inherit the tests' 8 devices
  first = run_program(*args, "--launch", "local", module="tinyjax.sweep", timeout=600)
  assert first.returncode == 0, first.stderr[-2000:]
  assert first.stdout.count(": new") == 2
  again = run_program(*args, "--launch", "local", "--report", module="tinyjax.sweep")
  assert again.returncode == 0, again.stderr[-2000:]
  assert again.stdout.count("completed, skipped") == 2 and "running" not in again.stdout
  with open(tmp_path / "runs" / "report.csv") as f:
    rows = list(csv.DictReader(f))
  assert [r["name"] for r in rows] == ["train_batch_size-4", "train_batch_size-8"]
  assert all(r["status"] == "completed" and r["completed_steps"] == "6" and r["eval_set"] == "python_docs"
             for r in rows)
  assert all(1.0 < float(r["bpb"]) < 4.0 and 5.0 < float(r["final_train_loss"]) < 9.0 for r in rows)
  assert int(rows[1]["total_tokens"]) == 2 * int(rows[0]["total_tokens"]) == 2 * 6 * 4 * 128
  for kind in ("batch", "scaling"):
    assert (tmp_path / "runs" / f"{kind}.png").stat().st_size > 15 * 1024


def test_preflight_prints_which_points_fit_where_and_refuses_a_launch_that_cannot(tmp_path, compiles, monkeypatch,
                                                                                 capsys):
  f = os.path.join(SWEEPS, "tiny.py")
  assert sweep.main([f, "--targets=h100,v5e-4", "--root", str(tmp_path)]) == 0  # plans only: nothing launched
  out = capsys.readouterr().out.splitlines()
  assert out[0].startswith("tinyjax.sweep: preflight of 6 points on h100, v5e-4")
  rows = {line.split()[0]: line.split()[1:] for line in out[2:8]}
  assert rows["train_batch_size-16_num_train_steps-20_lr_scaling_base_batch-16"] == ["NO", "16.0/15.9", "fits",
                                                                                     "4.0/15.9"]
  assert rows["train_batch_size-4_num_train_steps-80_lr_scaling_base_batch-0"] == ["fits", "4.0/15.9", "fits",
                                                                                   "1.0/15.9"]
  from tinyjax.launch import tpu  # noqa: PLC0415
  launched = []
  monkeypatch.setattr(tpu, "main", lambda argv: launched.append(argv) or 0)
  with pytest.raises(SystemExit) as e:
    sweep.main([f, "--launch", "tpu", "--root", "gs://b/t", "--", "--name=tj", "--zone=z", "--repo=r",
                "--accelerator-type=v5e-1"])
  err = capsys.readouterr().err.strip().splitlines()
  assert e.value.code == 2 and launched == [] and len(err) == 1
  assert err[0].startswith("tinyjax: error: 2 point(s) cannot fit v5e-1: train_batch_size-16_num_train_steps-20")
  assert sweep.main([f, "--launch", "tpu", "--root", "gs://b/t", "--", "--name=tj", "--zone=z", "--repo=r"]) == 0
  assert len(launched) == 6 and all("--skip-preflight" in argv for argv in launched), "checked once, by the sweep"
