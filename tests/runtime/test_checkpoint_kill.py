"""Checkpoints under SIGKILL (tinyjax/runtime/checkpoint.py): 5 random moments (one during an async save) never loses more than the checkpoint
interval, and the run still ends bitwise identical to an uninterrupted one. Slow (~2-3 min): marked `slow`."""
import json
import os
import random
import signal
import subprocess
import time

import pytest

from tinyjax.benchmarks import chaos

STEPS = 60


def command(workdir, cache_dir):
  """`python -m tinyjax.main` arguments of the run (tiny.py's body at vocab 512: the session's token cache fits it)."""
  return ["--config=configs/tiny.py", f"--workdir={workdir}",
          f"--config.data.cache_dir={cache_dir}", "--config.model.vocab_size=512", "--config.model.seq_len=32",
          "--config.train.train_batch_size=8", f"--config.train.num_train_steps={STEPS}",
          "--config.train.log_every=1", "--config.train.steps_per_eval=30", "--config.train.max_eval_batches=2",
          "--config.checkpoint.save_interval_steps=5"]


def final(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return {r["step"]: r["loss"] for r in rows if "loss" in r}, [r["param_sha256"] for r in rows if "param_sha256" in r]


def completed(run_program, *args):
  proc = run_program(*args, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
def test_sigkill_five_times_then_identical(run_program, token_cache, tmp_path):
  cache_dir = token_cache
  completed(run_program, *command(tmp_path / "ref", cache_dir))
  rng = random.Random(0)
  workdir = tmp_path / "killed"
  kills = []
  for attempt in range(5):
    proc = run_program(*command(workdir, cache_dir), popen=True, stderr=subprocess.DEVNULL)
    target = rng.randint(2, 9)  # kill a few logged steps after (re)start, at a random moment
    seen = 0
    for line in proc.stdout:
      if line.startswith("step ") and "| loss" in line:
        seen += 1
        if attempt == 0 and "step 5/" in line or attempt > 0 and seen >= target:
          # attempt 0: right after step 5's checkpoint was dispatched, i.e. during its async write
          time.sleep(rng.uniform(0.0, 0.05))
          proc.send_signal(signal.SIGKILL)
          kills.append(line.split("|")[0].strip())
          break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"attempt {attempt} ended before it was killed"
  completed(run_program, *command(workdir, cache_dir))
  losses, sha = final(workdir)
  ref_losses, ref_sha = final(tmp_path / "ref")
  assert losses == ref_losses, f"loss curve differs after kills at {kills}"
  assert sha == ref_sha and len(sha) == 1, f"final params differ after kills at {kills}"


def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [chaos.stable(json.loads(line)) for line in f]
  with open(os.path.join(workdir, "speedrun_results.json")) as f:
    return rows, chaos.stable(json.load(f))


def _kill_when(run_program, args, ready):
  """Runs the program and SIGKILLs it the moment ready() holds (polled every ms); returns what ready() saw."""
  proc = run_program(*args, popen=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  while proc.poll() is None:
    seen = ready()
    if seen:
      proc.send_signal(signal.SIGKILL)
      proc.wait()
      return seen
    time.sleep(0.001)
  raise AssertionError(f"the run ended (exit {proc.returncode}) before the kill moment")


@pytest.mark.slow
def test_sigkill_in_a_save_tmp_folder_and_after_the_final_checkpoint(run_program, token_cache, tmp_path):
  cache_dir = token_cache
  completed(run_program, *command(tmp_path / "ref", cache_dir))
  workdir = tmp_path / "killed"
  ckpts = workdir / "checkpoints"

  def in_tmp():  # a save's folder before its rename: orbax writes <step>.orbax-checkpoint-tmp-* first
    names = os.listdir(ckpts) if ckpts.is_dir() else []
    return [n for n in names if "tmp" in n]

  def final_committed():
    return (ckpts / str(STEPS) / "commit_success.txt").exists() and [str(STEPS)]

  assert _kill_when(run_program, command(workdir, cache_dir), in_tmp)
  assert _kill_when(run_program, command(workdir, cache_dir), final_committed)
  completed(run_program, *command(workdir, cache_dir))
  rows, results = _records(workdir)
  ref_rows, ref_results = _records(tmp_path / "ref")
  assert [r for r in rows if "param_sha256" in r] == [r for r in ref_rows if "param_sha256" in r]
  assert rows == ref_rows
  assert chaos.flat(results) == chaos.flat(ref_results)
