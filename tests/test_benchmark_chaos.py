"""tinyjax/benchmarks/chaos.py: what it counts as a difference (a finished workdir, written without training), its
one-line usage errors, and (slow) two real trials ending in its pinned last line."""
import json
import os
import shutil

import pytest

from tinyjax.benchmarks import chaos


def test_records_find_torn_and_duplicate_rows_and_leftover_folders(reference_run, tmp_path):
  w = tmp_path / "w"
  shutil.copytree(reference_run, w)
  ref = chaos.records(str(reference_run))
  assert ref["problems"] == [] and len(ref["sha"]) == 1 and ref["checkpoints"] == ["4", "8"]
  assert chaos.differences(ref, chaos.records(str(w))) == []
  rows = (w / "metrics.jsonl").read_text().splitlines(keepends=True)
  (w / "metrics.jsonl").write_text("".join(rows[:3] + rows[2:3] + rows[3:]) + rows[-1][:20])
  (w / "checkpoints" / "4" / "_CHECKPOINT_METADATA").unlink()  # half deleted
  (w / "checkpoints" / "deleting").mkdir()
  (w / "checkpoints" / "12.orbax-checkpoint-tmp").mkdir()
  info = json.loads((w / "run_info.json").read_text())
  (w / "run_info.json").write_text(json.dumps({**info, "status": "running", "end_time": "later"}))
  diff = chaos.differences(ref, chaos.records(str(w)))
  step = json.loads(rows[2])["step"]
  assert diff[:5] == [f"metrics.jsonl line {len(rows) + 2} is torn: {rows[-1][:20]!r}",
                      f"metrics.jsonl has duplicate rows for steps [{step}]",
                      "checkpoints/12.orbax-checkpoint-tmp left behind",
                      f"checkpoints/4 is incomplete (half-written or half-deleted): "
                      f"{sorted(os.listdir(w / 'checkpoints' / '4'))}",
                      "checkpoints/deleting left behind"]
  assert "run_info.json status: 'running' != 'completed'" in diff, diff  # end_time measures time: not compared
  assert not any("end_time" in d for d in diff)


def test_an_ending_is_judged_by_its_fault():
  kill = chaos.Fault("SIGKILL", "save", 0.01)
  assert chaos.judge_ending(kill, True, [-9], [""]) == []
  assert chaos.judge_ending(chaos.Fault("SIGTERM", "eval", 0.0), True, [75], ["tinyjax: stopped by SIGTERM\n"]) == []
  assert chaos.judge_ending(None, False, [0], ["W1207 12:00:00.1 1 x.cc:1] late\n"])[0].endswith(
      "trace-like output: 'W1207 12:00:00' in 'W1207 12:00:00.1 1 x.cc:1] late'")
  assert chaos.judge_ending(chaos.Fault("SIGHUP", "setup", 0.0), True, [-1], [""])[0].startswith(
      "SIGHUP setup+0.0s+0ms -> process 0: exit -1 (expected [0, 75])")
  assert chaos.judge_ending(None, False, [0], ["warning: x\n"]) == [
      "restart -> process 0: 1 stderr line(s) besides tinyjax's: ['warning: x']"]


@pytest.mark.parametrize("args,message", [(["--trials", "0"], "--trials must be >= 1"),
                                          (["--trials", "1", "--kinds", "SIGSEGV"], "allowed: SIGKILL, SIGTERM")])
def test_usage_errors_are_one_line(run_program, one_line, args, message):
  one_line(run_program(*args, module="tinyjax.benchmarks.chaos", timeout=60), 2, message)


@pytest.mark.slow  # a warm-up, the reference and two trials of 8 steps (~2-3 min on 2 busy cores)
def test_two_trials_end_in_the_pinned_line(run_program, tmp_path):
  proc = run_program("--trials", "2", "--seed", "3", "--steps", "8", "--root", tmp_path,
                     module="tinyjax.benchmarks.chaos", timeout=900)
  lines = proc.stdout.strip().splitlines()
  assert proc.returncode == 0 and lines[-1] == "chaos: 2/2 identical", proc.stdout[-3000:] + proc.stderr[-3000:]
  assert [line.startswith(f"trial {i}: ") for i, line in enumerate(lines[1:3])] == [True, True], lines
  assert not [n for n in os.listdir(tmp_path) if n.startswith("trial")], "identical trials leave no files"
