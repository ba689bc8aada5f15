"""SLURM launcher: writes an sbatch script for one or more GPU nodes and submits it (`sbatch`).

python -m tinyjax.launch.slurm --job-name=NAME [--nodes=1] [--gpus-per-node=8] [--per=gpu|node] [--time=24:00:00]
                               [--partition=P] [--account=A] [--python=PATH] [--script=FILE] [--dry-run]
                               -- MAIN ARGS
MAIN ARGS go unchanged to `python -m tinyjax.main` in every task (srun), e.g.
  -- --config=configs/c4_50m.py --workdir=/shared/runs/c4_50m
--per=gpu (default): one process per GPU; JAX's SLURM detection (SLURM_JOB_ID, SLURM_NTASKS, SLURM_PROCID,
SLURM_LOCALID, SLURM_STEP_NODELIST) forms the run and gives each process GPU number SLURM_LOCALID.
--per=node: one process per node with all its GPUs (coordinator passed explicitly; see commands._task_command).
The job is --requeue'd on preemption and on its time limit (USR1 -> SIGTERM -> checkpoint, exit 75 -> requeue).
--gpu-type=h100 (h200, a100-40gb, a100-80gb): before writing anything, the run is compiled for NODES x GPUS of that
GPU by the CUDA compiler (tinyjax/aot.py, pip install -e '.[cuda-compile]') and refused (one line, exit 2) if it
cannot fit; --skip-preflight submits without it.
"""
from __future__ import annotations

import os
import sys

from tinyjax import cli
from tinyjax.launch import commands as C
from tinyjax.launch.tpu import Runner, preflight


def _parser() -> cli.ArgParser:
  p = cli.ArgParser(prog="python -m tinyjax.launch.slurm", description=__doc__.splitlines()[0])
  p.add_argument("--job-name", required=True)
  p.add_argument("--nodes", type=int, default=1)
  p.add_argument("--gpus-per-node", type=int, default=8)
  p.add_argument("--per", choices=("gpu", "node"), default="gpu", help="one process per GPU or per node")
  p.add_argument("--time", default="24:00:00", help="time limit per (re)queued run")
  p.add_argument("--partition", default="")
  p.add_argument("--account", default="")
  p.add_argument("--cpus-per-task", type=int, default=0)
  p.add_argument("--signal-s", type=int, default=120, help="seconds before the time limit to checkpoint")
  p.add_argument("--python", default=sys.executable, help="Python on the nodes (default: this one)")
  p.add_argument("--chdir", default=os.getcwd(), help="tinyjax checkout on shared storage (default: here)")
  p.add_argument("--log-dir", default="slurm_logs", help="for the job's output files (created here)")
  p.add_argument("--script", default="", help="where to write the sbatch script (default LOG_DIR/JOB_NAME.sbatch)")
  p.add_argument("--dry-run", action="store_true", help="print the script and the sbatch command; submit nothing")
  p.add_argument("--gpu-type", default="", help="h100, h200, a100-40gb or a100-80gb: compile the run for the job's "
                 "GPUs first and refuse one that cannot fit (no preflight without it)")
  p.add_argument("--skip-preflight", action="store_true", help="submit without the --gpu-type compile")
  return p


def main(argv: list[str]) -> int:
  own, main_args = C.split_at_dashes(argv)
  a = _parser().parse_args(own)
  if not main_args:
    cli.fail("the training arguments go after --, e.g. -- --config=configs/c4_50m.py --workdir=/shared/runs/x")
  if a.nodes < 1 or a.gpus_per_node < 1:
    cli.fail(f"--nodes={a.nodes} and --gpus-per-node={a.gpus_per_node} must be >= 1")
  if a.gpu_type:
    preflight(main_args, f"{a.nodes}x{a.gpus_per_node}x{a.gpu_type}", a.skip_preflight)
  s = C.Slurm(a.job_name, a.nodes, a.gpus_per_node, a.per, a.time, a.partition, a.account, a.cpus_per_task,
              a.signal_s, a.python, a.chdir, a.log_dir)
  script = C.sbatch_script(s, main_args)
  path = a.script or os.path.join(a.log_dir, f"{a.job_name}.sbatch")
  if a.dry_run:
    print(f"# {path}\n{script}", end="")
  else:
    os.makedirs(a.log_dir, exist_ok=True)  # sbatch's --output directory must exist
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
      f.write(script)
  return Runner(a.dry_run).call(C.sbatch(path))


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
