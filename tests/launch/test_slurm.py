"""tinyjax.launch.slurm against the fake sbatch / srun / scontrol of conftest.py: the sbatch script's header and
submission, per-GPU and per-node steps, requeue on exit 75 and 4, the time-limit signal, dry runs and the preflight."""
import os
import subprocess
import time

import pytest

from tinyjax import aot
from tinyjax.launch import slurm

MAIN = ["--config=configs/c4_50m.py", "--config.train.train_batch_size=64", "--workdir=gs://bkt/runs/a b"]


def _refuse(args, target):
  from tinyjax import config  # noqa: PLC0415
  raise config.ConfigError(f"{target} cannot hold this run: the train step needs 99.0 GiB per chip")


@pytest.mark.parametrize("argv, message", [
    (["--nodes=2", "--", "--config=c"], "the following arguments are required: --job-name"),
    (["--job-name=j"], "the training arguments go after --"),
])
def test_missing_arguments_are_one_line_exit_2(argv, message, capsys):
  with pytest.raises(SystemExit) as e:
    slurm.main(argv)
  err = capsys.readouterr().err.strip()
  assert e.value.code == 2 and len(err.splitlines()) == 1 and message in err


def _submit(tmp_path, *args):
  script = tmp_path / "job.sbatch"
  rc = slurm.main(["--job-name=bs64", f"--log-dir={tmp_path / 'logs'}", f"--script={script}",
                   f"--python={tmp_path / 'bin' / 'python-on-node'}", f"--chdir={tmp_path}", *args, "--", *MAIN])
  return rc, script


def test_sbatch_script_header_and_submission(fake, tmp_path):
  rc, script = _submit(tmp_path, "--nodes=2", "--gpus-per-node=4", "--partition=gpu", "--time=4:00:00")
  assert rc == 0
  assert fake.calls() == [{"prog": "sbatch", "argv": [str(script)], "env": {}}]
  header = [line for line in script.read_text().splitlines() if line.startswith("#SBATCH")]
  assert header == ["#SBATCH --job-name=bs64", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4",
                    "#SBATCH --gpus-per-node=4", "#SBATCH --time=4:00:00", "#SBATCH --requeue",
                    "#SBATCH --signal=B:USR1@120", "#SBATCH --open-mode=append",
                    f"#SBATCH --output={tmp_path / 'logs'}/%x-%j.out", "#SBATCH --partition=gpu"]
  assert os.path.isdir(tmp_path / "logs")


def _run_script(script, **env):
  full = {**os.environ, "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu-node-[07-08]", **env}
  return subprocess.run(["bash", str(script)], env=full, capture_output=True, text=True, timeout=30)


def test_sbatch_per_gpu_step_and_requeue_on_exit_75(fake, tmp_path):
  _, script = _submit(tmp_path, "--nodes=2", "--gpus-per-node=4")
  r = _run_script(script, FAKE_RC="75")  # srun's step: tinyjax checkpointed on SIGTERM and exited 75
  assert r.returncode == 75, r.stderr
  srun = [c for c in fake.calls() if c["prog"] == "srun"]
  assert srun[0]["argv"] == ["--ntasks=8", "--ntasks-per-node=4", str(tmp_path / "bin" / "python-on-node"),
                             "-m", "tinyjax.main", *MAIN]  # no tinyjax flags: JAX reads SLURM_* itself
  assert [c["argv"] for c in fake.calls() if c["prog"] == "scontrol"][-1] == ["requeue", "4242"]
  r = _run_script(script, FAKE_RC="1")
  assert r.returncode == 1
  assert sum(c["argv"] == ["requeue", "4242"] for c in fake.calls()) == 1, "a crash is not requeued"


def test_sbatch_requeues_a_step_that_lost_a_host(fake, tmp_path):
  """Exit 4: a node (or one task's process) of the step was lost and the others left; a rerun resumes, as after 75
  (before: only 75 was requeued, and the job ended)."""
  _, script = _submit(tmp_path, "--nodes=2", "--gpus-per-node=4")
  r = _run_script(script, FAKE_RC="4")
  assert r.returncode == 4, r.stderr
  assert [c["argv"] for c in fake.calls() if c["prog"] == "scontrol"][-1] == ["requeue", "4242"]
  assert "training step exited with code 4" in r.stdout


def test_sbatch_per_node_passes_the_coordinator(fake, tmp_path, monkeypatch):
  _, script = _submit(tmp_path, "--nodes=2", "--gpus-per-node=8", "--per=node")
  assert "#SBATCH --ntasks-per-node=1" in script.read_text()
  r = _run_script(script, FAKE_SRUN_EXEC="1", SLURM_LOCALID="0")
  assert r.returncode == 0, r.stderr
  task = [c for c in fake.calls() if c["prog"] == "python-on-node"][0]
  assert task["argv"] == ["-m", "tinyjax.main", *MAIN, "--config.distributed.coordinator_address=gpu-node-07:61586",
                          "--config.distributed.num_processes=2", "--config.distributed.process_id=1"]
  assert "SLURM_LOCALID" not in task["env"], "else JAX would pin the process to GPU 0 only"


def test_sbatch_time_limit_signal_reaches_the_step(fake, tmp_path):
  """USR1 to the batch shell (sbatch --signal=B:USR1@120) becomes SIGTERM to the srun step, whose exit 75 requeues."""
  _, script = _submit(tmp_path)
  srun = fake.dir / "srun"  # a step that checkpoints on SIGTERM: exit 75
  started = tmp_path / "step_started"
  srun.write_text(f"#!/bin/bash\ntrap 'exit 75' TERM\ntouch {started}\nwhile :; do sleep 0.05; done\n")
  proc = subprocess.Popen(["bash", str(script)], env={**os.environ, "SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "n1"},
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  for _ in range(400):  # the step runs: the batch shell has set its traps before starting it
    if started.exists():
      break
    time.sleep(0.05)
  proc.send_signal(10)  # SIGUSR1
  out, _ = proc.communicate(timeout=20)
  assert proc.returncode == 75, out
  assert "time limit in 120 s: SIGTERM to the training step" in out
  assert [c["argv"] for c in fake.calls() if c["prog"] == "scontrol"][-1] == ["requeue", "7"]


def test_slurm_dry_run_prints_script_and_command(fake, tmp_path, capsys):
  rc, script = _submit(tmp_path, "--dry-run")
  out = capsys.readouterr().out
  assert rc == 0 and not script.exists() and fake.calls() == []
  assert out.startswith(f"# {script}\n#!/bin/bash\n") and out.rstrip().endswith(f"sbatch {script}")


def test_slurm_preflight_compiles_for_the_jobs_gpus(fake, tmp_path, preflights, monkeypatch, capsys):
  rc, _ = _submit(tmp_path, "--nodes=2", "--gpus-per-node=8", "--gpu-type=h100")
  assert rc == 0 and preflights[0][0] == "2x8xh100"
  monkeypatch.setattr(aot, "preflight", _refuse)
  before = len(fake.calls())
  with pytest.raises(SystemExit) as e:
    _submit(tmp_path, "--gpu-type=h100")
  assert e.value.code == 2 and len(fake.calls()) == before, "no sbatch"
