"""Every command line the launchers run, as pure functions: gcloud argv lists, remote shell lines, the sbatch script.

The gcloud flags are the documented ones of `gcloud compute tpus tpu-vm {create,describe,ssh,delete}` and
`gcloud compute tpus queued-resources {create,describe,delete}` (cloud.google.com/sdk/gcloud/reference/compute/tpus).
"""
from __future__ import annotations

import dataclasses
import os
import re
import shlex

from tinyjax import errors

GCLOUD = "gcloud"
TPU_VM = ("compute", "tpus", "tpu-vm")
QUEUED = ("compute", "tpus", "queued-resources")
REMOTE_DIR = "~/tinyjax"  # the checkout + venv on every worker
LOG_DIR = "~/tinyjax_logs"  # one log file per worker: <log name>-<worker hostname>.log
PYTHON = "3.11"  # the workers' venv: the Python tinyjax is developed and tested on (pyproject: >= 3.11)
UV = "uv==0.13.8"  # from PyPI; the version tests/launch/test_tpu.py runs the setup script with
UV_HOME = "~/.tinyjax-uv"  # a venv of the image's python3 that holds uv

# Runtime (software) versions by accelerator family, from the Cloud TPU docs' "TPU software versions" table.
RUNTIME_VERSIONS = {"v4": "tpu-ubuntu2204-base", "v5litepod": "v2-alpha-tpuv5-lite", "v5p": "v2-alpha-tpuv5",
                    "v6e": "v2-alpha-tpuv6e"}


@dataclasses.dataclass(frozen=True)
class Tpu:
  """One TPU VM (single host or a multi-host slice)."""
  name: str
  zone: str
  accelerator_type: str = "v4-8"
  version: str = ""  # "" = RUNTIME_VERSIONS[family of accelerator_type]
  project: str = ""  # "" = gcloud's core/project
  spot: bool = False  # Spot VM: cheaper, may be reclaimed at any time (the babysitter recreates it)
  queued: bool = False  # create through a queued resource (waits for capacity instead of failing)

  @property
  def runtime(self) -> str:
    return self.version or RUNTIME_VERSIONS.get(self.accelerator_type.split("-")[0], RUNTIME_VERSIONS["v4"])

  def where(self) -> list[str]:
    return [f"--zone={self.zone}"] + ([f"--project={self.project}"] if self.project else [])


def create(t: Tpu) -> list[str]:
  spot = ["--spot"] if t.spot else []
  if t.queued:  # the node gets the queued resource's name, so describe/ssh/delete address it the same way
    return [GCLOUD, *QUEUED, "create", t.name, f"--node-id={t.name}", *t.where(),
            f"--accelerator-type={t.accelerator_type}", f"--runtime-version={t.runtime}", *spot]
  return [GCLOUD, *TPU_VM, "create", t.name, *t.where(), f"--accelerator-type={t.accelerator_type}",
          f"--version={t.runtime}", *spot]


def describe_state(t: Tpu) -> list[str]:
  """Prints the node's state (READY, CREATING, PREEMPTED, ...); exits non-zero when the node does not exist."""
  return [GCLOUD, *TPU_VM, "describe", t.name, *t.where(), "--format=value(state)"]


def describe_queued_state(t: Tpu) -> list[str]:
  """Prints the queued resource's state (WAITING_FOR_RESOURCES, ACTIVE, SUSPENDED, ...: QueuedResourceState.State);
  exits non-zero when there is no such queued resource."""
  return [GCLOUD, *QUEUED, "describe", t.name, *t.where(), "--format=value(state.state)"]


def start(t: Tpu) -> list[str]:
  """Starts a STOPPED node (its disks kept); fails for nodes that cannot be stopped and started (e.g. Spot)."""
  return [GCLOUD, *TPU_VM, "start", t.name, *t.where()]


def delete(t: Tpu) -> list[str]:
  if t.queued:  # --force deletes the queued resource's nodes first (a preempted one blocks recreation otherwise)
    return [GCLOUD, *QUEUED, "delete", t.name, *t.where(), "--force", "--quiet"]
  return [GCLOUD, *TPU_VM, "delete", t.name, *t.where(), "--quiet"]


def ssh(t: Tpu, command: str | None = None, worker: str = "all") -> list[str]:
  """The same command on every worker at once (--worker=all); no command = an interactive shell on one worker."""
  return [GCLOUD, *TPU_VM, "ssh", t.name, *t.where(), f"--worker={worker}"] + (
      [f"--command={command}"] if command is not None else [])


def setup_script(repo: str, ref: str = "main", extras: str = "tpu,gcs") -> str:
  """Idempotent worker setup: clone once, check out `ref`, a Python 3.11 venv, `pip install -e .[tpu,gcs]`.

  The TPU runtime images are Ubuntu 22.04, whose python3 is 3.10, below tinyjax's requires-python (>= 3.11). uv
  (from PyPI, into a small venv of the image's python3: no root, no apt lock) installs a standalone CPython 3.11 in
  the user's home and builds the venv on it; a venv of another Python (an older setup's 3.10) is replaced."""
  d, uv = REMOTE_DIR, f"{UV_HOME}/bin/uv"
  major, minor = PYTHON.split(".")
  return " && ".join([
      "set -e",
      f"if [ ! -d {d}/.git ]; then git clone --quiet {shlex.quote(repo)} {d}; fi",
      f"cd {d}",
      f"git fetch --quiet origin {shlex.quote(ref)}",
      "git checkout --quiet --detach FETCH_HEAD",
      f"if [ ! -x {UV_HOME}/bin/pip ]; then python3 -m venv {UV_HOME}; fi",
      f"{UV_HOME}/bin/pip install --quiet --disable-pip-version-check {UV}",  # a no-op once installed
      f"if ! .venv/bin/python -c 'import sys; sys.exit(sys.version_info[:2] != ({major}, {minor}))' 2>/dev/null; "
      f"then rm -rf .venv; {uv} venv --quiet --python {PYTHON} .venv; fi",
      f"{uv} pip install --quiet --python .venv/bin/python -e {shlex.quote(f'.[{extras}]')}",
      ".venv/bin/python -c 'import platform, socket, jax, tinyjax; print(\"tinyjax ready on\", socket.gethostname(), "
      "\"python\", platform.python_version(), \"jax\", jax.__version__)'",
  ])


def run_name(values: dict) -> str:
  """The one naming rule for the workdirs of runs a program starts (sweep points, stability runs): the last part of
  each key and its value ("train_batch_size-16_warmup-0.05"), a "config" value (another base config file) by its
  file stem; deterministic and filesystem-safe."""
  parts = [os.path.splitext(os.path.basename(str(v)))[0] if key == "config" else f"{key.split('.')[-1]}-{v}"
           for key, v in values.items()]
  return re.sub(r"[^A-Za-z0-9._-]", "_", "_".join(parts)) or "base"


def split_at_dashes(argv: list[str]) -> tuple[list[str], list[str]]:
  """A launcher's own arguments, and the ones after `--` (passed on to the program it starts)."""
  if "--" not in argv:
    return list(argv), []
  i = argv.index("--")
  return list(argv[:i]), list(argv[i + 1:])


def main_argv(main_args: list[str], python: str = "python") -> list[str]:
  """`python -m tinyjax.main ARGS`: ARGS (--config=..., --config.a.b=v, --workdir=gs://...) pass through unchanged."""
  return [python, "-m", "tinyjax.main", *main_args]


def run_script(main_args: list[str], log_name: str = "run", detach: bool = False) -> str:
  """The training command as each worker runs it: tee'd (or, detached, appended) to its own log file."""
  log = f"{LOG_DIR}/{log_name}-$(hostname).log"
  cmd = shlex.join(main_argv(main_args, ".venv/bin/python"))
  start = f"cd {REMOTE_DIR} && mkdir -p {LOG_DIR}"
  if detach:
    return f"{start} && (nohup {cmd} >> {log} 2>&1 < /dev/null &)"
  return f"{start} && set -o pipefail && {cmd} 2>&1 | tee -a {log}"  # pipefail: ssh's exit code is tinyjax's


def logs_script(log_name: str = "run", lines: int = 50) -> str:
  return f"tail -n {int(lines)} {LOG_DIR}/{log_name}-*.log"


@dataclasses.dataclass(frozen=True)
class Slurm:
  """One SLURM job over `nodes` GPU nodes."""
  job_name: str
  nodes: int = 1
  gpus_per_node: int = 8
  per: str = "gpu"  # "gpu": one process per GPU (JAX's SLURM default) | "node": one process sees all its GPUs
  time: str = "24:00:00"
  partition: str = ""
  account: str = ""
  cpus_per_task: int = 0  # 0 = the cluster's default
  signal_s: int = 120  # USR1 this many seconds before the time limit: checkpoint, exit 75, requeue
  python: str = "python"  # interpreter on the nodes, e.g. /shared/tinyjax/.venv/bin/python
  chdir: str = "."  # the tinyjax checkout on shared storage
  log_dir: str = "slurm_logs"

  @property
  def tasks_per_node(self) -> int:
    return self.gpus_per_node if self.per == "gpu" else 1


def _sbatch_header(s: Slurm) -> list[str]:
  lines = [f"--job-name={s.job_name}", f"--nodes={s.nodes}", f"--ntasks-per-node={s.tasks_per_node}",
           f"--gpus-per-node={s.gpus_per_node}", f"--time={s.time}", "--requeue",
           f"--signal=B:USR1@{s.signal_s}", "--open-mode=append", f"--output={s.log_dir}/%x-%j.out"]
  lines += [f"--partition={s.partition}"] if s.partition else []
  lines += [f"--account={s.account}"] if s.account else []
  lines += [f"--cpus-per-task={s.cpus_per_task}"] if s.cpus_per_task else []
  return ["#!/bin/bash"] + [f"#SBATCH {line}" for line in lines]


def _task_command(s: Slurm, main_args: list[str]) -> str:
  """What srun starts per task. Per GPU: plain tinyjax.main; JAX reads SLURM_* and takes GPU number SLURM_LOCALID.
  Per node: JAX would also pin device [SLURM_LOCALID] = [0], so the task drops SLURM_LOCALID (JAX's SLURM detection
  needs it) and names the coordinator explicitly, keeping all the node's GPUs."""
  cmd = shlex.join(main_argv(main_args, s.python))
  if s.per == "gpu":
    return cmd
  inner = (f'unset SLURM_LOCALID; exec {cmd} --config.distributed.coordinator_address="$TINYJAX_COORDINATOR" '
           '--config.distributed.num_processes="$SLURM_NTASKS" --config.distributed.process_id="$SLURM_PROCID"')
  return f"bash -c {shlex.quote(inner)}"


def sbatch_script(s: Slurm, main_args: list[str]) -> str:
  """The batch script: one srun step; time limit -> USR1 -> SIGTERM to the step; exit 75 or 4 -> scontrol requeue."""
  ntasks = s.nodes * s.tasks_per_node
  body = [
      "# Generated by python -m tinyjax.launch.slurm. Preemption: SLURM requeues the job (--requeue) and SIGTERMs",
      "# the step; the time limit: USR1 (--signal) is turned into SIGTERM. tinyjax checkpoints on SIGTERM and exits",
      f"# {errors.EXIT_PREEMPTED}, which requeues the job; so does {errors.EXIT_LOST_HOST} (a node or process of the step lost: the others",
      "# exit 4). The rerun resumes from the workdir's latest checkpoint.",
      "set -u",
      f"cd {shlex.quote(s.chdir)}",
      'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
      'export TINYJAX_COORDINATOR="$head_node:$((SLURM_JOB_ID % 4096 + 61440))"  # per-node mode only',
      'step=""',
      'forward() { echo "tinyjax: $1: SIGTERM to the training step"; [ -n "$step" ] && kill -TERM "$step"; }',
      "trap 'forward \"time limit in " + str(s.signal_s) + " s\"' USR1",
      "trap 'forward preempted' TERM",
      f"srun --ntasks={ntasks} --ntasks-per-node={s.tasks_per_node} {_task_command(s, main_args)} &",
      "step=$!",
      'while :; do wait "$step"; rc=$?; kill -0 "$step" 2>/dev/null || break; done  # a trap interrupts wait',
      'echo "tinyjax: training step exited with code $rc"',
      f'if [ "$rc" -eq {errors.EXIT_PREEMPTED} ] || [ "$rc" -eq {errors.EXIT_LOST_HOST} ]; then  # a rerun resumes either',
      '  scontrol requeue "$SLURM_JOB_ID" || true',
      'fi',
      'exit "$rc"',
  ]
  return "\n".join(_sbatch_header(s) + body) + "\n"


def sbatch(script_path: str) -> list[str]:
  return ["sbatch", script_path]
