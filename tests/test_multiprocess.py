"""Several processes on this machine form one run the way a cluster starts them: SLURM's environment (srun) with
no tinyjax-specific flags, CPU collectives (gloo), 2 fake devices per process."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from tinyjax import metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["--config=configs/tiny.py", "--config.model.hidden_dim=32", "--config.model.intermediate_dim=64",
        "--config.model.num_layers=2", "--config.model.seq_len=32", "--config.model.vocab_size=512",
        "--config.model.compute_dtype=float32", "--config.train.train_batch_size=8", "--config.train.log_every=1",
        "--config.train.steps_per_eval=1000", "--config.train.max_eval_batches=1",
        "--config.checkpoint.save_interval_steps=4"]


def _env(devices: int, slurm: dict | None, cache: str) -> dict:
  env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "XLA_FLAGS"))}
  env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
  return {**env, **(slurm or {})}


def launch(workdir, cache, steps: int, processes: int, devices: int, *extra):
  """Starts the run's processes (a 2-task SLURM step when processes > 1); returns the Popen objects."""
  job = str(random.randrange(10_000, 99_999))
  args = [sys.executable, "-m", "tinyjax.main", *ARGS, f"--config.train.num_train_steps={steps}",
          f"--config.data.cache_dir={cache}", f"--workdir={workdir}", *extra]
  procs = []
  for i in range(processes):
    slurm = None if processes == 1 else {"SLURM_JOB_ID": job, "SLURM_NTASKS": str(processes),
                                         "SLURM_PROCID": str(i), "SLURM_LOCALID": str(i),
                                         "SLURM_STEP_NODELIST": "localhost"}
    procs.append(subprocess.Popen(args, cwd=ROOT, env=_env(devices, slurm, cache), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True))
  return procs


def finish(procs, timeout=300):
  return [(p.wait(timeout=timeout), p.stdout.read(), p.stderr.read()) for p in procs]


def trajectory(workdir):
  """(step, quantity) -> value for the loss, gradient norm and parameter norm of every logged step."""
  return {(r["step"], q): r[q] for r in metrics.read(str(workdir)) if "loss" in r and "event" not in r
          for q in ("loss", "grad_norm", "param_norm")}


def same_run(a, b, rel=1e-5):
  """Equal within fp32 reduction-order noise: cross-process all-reduces sum in another order than one process."""
  ta, tb = trajectory(a), trajectory(b)
  return ta.keys() == tb.keys() and all(abs(ta[k] - tb[k]) <= rel * max(1.0, abs(tb[k])) for k in tb)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def single(cache, tmp_path_factory):
  """The reference: 1 process x 4 devices, 8 steps."""
  workdir = tmp_path_factory.mktemp("single")
  (rc, _, err), = finish(launch(workdir, cache, 8, 1, 4))
  assert rc == 0, err
  return workdir


@pytest.mark.slow
def test_slurm_environment_forms_one_two_process_run(cache, single, tmp_path):
  results = finish(launch(tmp_path, cache, 8, 2, 2))
  assert [rc for rc, _, _ in results] == [0, 0], [err[-2000:] for _, _, err in results]
  info = json.load(open(tmp_path / "run_info.json"))
  assert info["devices"]["process_count"] == 2 and info["devices"]["device_count"] == 4
  assert info["env"]["distributed"]["initialized"] is True
  assert max(s for s, _ in trajectory(tmp_path)) == 8
  assert same_run(tmp_path, single), "2 processes x 2 devices must train as 1 process x 4 devices"
  assert "step 8/8" in results[0][1] and "step 8/8" not in results[1][1], "process 0 alone prints progress"


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])  # SIGHUP: re-sent as JAX's SIGTERM notice
def test_stop_signal_to_one_process_checkpoints_both_and_resumes(cache, single, tmp_path, sig):
  procs = launch(tmp_path, cache, 8, 2, 2)
  deadline = time.time() + 240
  while not any(r.get("step", 0) >= 3 for r in metrics.read(str(tmp_path))) and time.time() < deadline:
    time.sleep(0.2)
  procs[1].send_signal(sig)  # e.g. one TPU VM host gets the maintenance notice, or loses its ssh session
  results = finish(procs)
  assert [rc for rc, _, _ in results] == [75, 75], [err[-2000:] for _, _, err in results]
  steps = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit())
  preempted = [r["step"] for r in metrics.read(str(tmp_path)) if r.get("event") == "preempted"]
  assert steps and preempted and preempted[-1] in steps, (steps, preempted)  # both stopped at one checkpointed step
  results = finish(launch(tmp_path, cache, 8, 2, 2))
  assert [rc for rc, _, _ in results] == [0, 0], [err[-2000:] for _, _, err in results]
  assert same_run(tmp_path, single), "the resumed 2-process run must end where the uninterrupted one does"


@pytest.mark.slow
def test_a_lost_process_makes_the_other_exit_with_a_clear_message(cache, tmp_path):
  procs = launch(tmp_path, cache, 400, 2, 2, "--config.distributed.step_timeout_s=20",
                 "--config.checkpoint.save_interval_steps=1000")
  deadline = time.time() + 240
  while not any(r.get("step", 0) >= 3 for r in metrics.read(str(tmp_path))) and time.time() < deadline:
    time.sleep(0.2)
  start = time.time()
  procs[1].kill()  # the host is gone: no signal handler, no goodbye
  rc = procs[0].wait(timeout=120)
  err = procs[0].stderr.read()
  assert rc != 0 and time.time() - start < 90
  line = [ln for ln in err.splitlines() if ln.startswith("tinyjax: error:")]
  assert line and ("process" in line[-1] and ("gone" in line[-1] or "lost" in line[-1])), err[-3000:]
