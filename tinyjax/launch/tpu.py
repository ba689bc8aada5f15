"""TPU VM launcher: create | setup | run | status | logs | ssh | delete | babysit, over plain `gcloud`.

python -m tinyjax.launch.tpu VERB --name=NAME --zone=ZONE [--accelerator-type=v4-8] [--spot] [--queued]
                             [--dry-run] [VERB flags] [-- MAIN ARGS]
MAIN ARGS go unchanged to `python -m tinyjax.main` on every worker (--worker=all), e.g.
  -- --config=configs/c4_50m.py --workdir=gs://BUCKET/runs/c4_50m
On a slice each worker is one process; tinyjax.main's jax.distributed.initialize() finds the slice by itself.
babysit: ensure the VM is READY (create or, when PREEMPTED/TERMINATED, delete and recreate; then setup), run, and
on preemption (the run fails and the VM is no longer READY, or tinyjax exits 75) do it again, at most
--max-restarts times; tinyjax resumes from the workdir's latest checkpoint.
"""
from __future__ import annotations

import shlex
import subprocess
import sys
import time

from tinyjax import cli
from tinyjax.launch import commands as C

DEAD_STATES = ("PREEMPTED", "TERMINATED")  # a node that will not come back: delete and recreate it
SSH_FAILED = 255  # ssh's own failure code (a reclaimed VM drops the connection)


class Runner:
  """Runs argv lists, or with dry_run prints them (shell-quoted, one per line) and pretends they succeeded."""

  def __init__(self, dry_run: bool):
    self.dry_run = dry_run

  def call(self, argv: list[str]) -> int:
    if self.dry_run:
      print(shlex.join(argv), flush=True)
      return 0
    print(f"+ {shlex.join(argv)}", file=sys.stderr, flush=True)
    return subprocess.call(argv)

  def output(self, argv: list[str]) -> tuple[int, str]:
    if self.dry_run:
      print(shlex.join(argv), flush=True)
      return 0, "READY"
    r = subprocess.run(argv, capture_output=True, text=True)
    return r.returncode, r.stdout.strip()


def state(t: C.Tpu, runner: Runner) -> str | None:
  rc, out = runner.output(C.describe_state(t))
  return out.splitlines()[-1] if rc == 0 and out else None


def ensure_ready(t: C.Tpu, runner: Runner, poll_s: float, timeout_s: float, sleep=time.sleep) -> bool:
  """Blocks until the node is READY, creating it (again) as needed; returns whether it was (re)created."""
  created, deadline = False, time.monotonic() + timeout_s
  while True:
    now = state(t, runner)
    if now == "READY":
      return created
    if now in DEAD_STATES:
      print(f"tinyjax.launch: {t.name} is {now}: deleting it to recreate it", file=sys.stderr, flush=True)
      runner.call(C.delete(t))
      now = None
    if now is None:
      if runner.call(C.create(t)) != 0:  # e.g. no capacity right now: try again after poll_s
        print(f"tinyjax.launch: creating {t.name} failed; retrying in {poll_s:.0f} s", file=sys.stderr, flush=True)
      created = True
    if time.monotonic() > deadline:
      raise TimeoutError(f"{t.name} not READY after {timeout_s:.0f} s (last state {now})")
    sleep(poll_s)


def babysit(t: C.Tpu, runner: Runner, main_args: list[str], repo: str, ref: str, max_restarts: int,
            poll_s: float = 30.0, timeout_s: float = 3600.0, log_name: str = "run", sleep=time.sleep) -> int:
  """Runs main_args on the VM until it finishes, recreating the VM and rerunning after each preemption."""
  restarts, set_up = 0, False
  while True:
    if ensure_ready(t, runner, poll_s, timeout_s, sleep) or not set_up:
      set_up = runner.call(C.ssh(t, C.setup_script(repo, ref))) == 0
    rc = runner.call(C.ssh(t, C.run_script(main_args, log_name))) if set_up else SSH_FAILED
    if rc == 0 or runner.dry_run:
      print(f"tinyjax.launch: {t.name}: run finished", file=sys.stderr, flush=True)
      return rc
    now = state(t, runner)
    if now == "READY" and rc not in (C.EXIT_PREEMPTED, SSH_FAILED):
      print(f"tinyjax.launch: run failed with exit code {rc} on a READY VM: not retrying", file=sys.stderr)
      return rc
    restarts += 1
    if restarts > max_restarts:
      print(f"tinyjax.launch: giving up after {max_restarts} restarts (exit code {rc}, VM {now})", file=sys.stderr)
      return rc
    print(f"tinyjax.launch: restart {restarts}/{max_restarts}: exit code {rc}, VM {now}", file=sys.stderr,
          flush=True)


def _parser() -> cli.ArgParser:
  p = cli.ArgParser(prog="python -m tinyjax.launch.tpu", description=__doc__.splitlines()[0])
  p.add_argument("verb", choices=("create", "setup", "run", "status", "logs", "ssh", "delete", "babysit"))
  p.add_argument("--name", required=True, help="TPU VM (node) name")
  p.add_argument("--zone", required=True)
  p.add_argument("--project", default="")
  p.add_argument("--accelerator-type", default="v4-8")
  p.add_argument("--version", default="", help="runtime version (default: by accelerator family)")
  p.add_argument("--spot", action="store_true", help="Spot VM (create, babysit)")
  p.add_argument("--queued", action="store_true", help="create through a queued resource")
  p.add_argument("--repo", default="", help="setup/babysit: git URL of tinyjax to clone on every worker")
  p.add_argument("--ref", default="main", help="setup/babysit: branch, tag or commit to check out")
  p.add_argument("--extras", default="tpu,gcs", help="setup: pip extras to install")
  p.add_argument("--log-name", default="run", help="run/logs: log file ~/tinyjax_logs/NAME-<host>.log")
  p.add_argument("--detach", action="store_true", help="run: start in the background and return")
  p.add_argument("--lines", type=int, default=50, help="logs: lines per worker")
  p.add_argument("--worker", default="0", help="ssh: worker index (or all)")
  p.add_argument("--max-restarts", type=int, default=20, help="babysit: recreations/reruns before giving up")
  p.add_argument("--poll-s", type=float, default=30.0, help="babysit: seconds between state checks")
  p.add_argument("--ready-timeout-s", type=float, default=3600.0, help="babysit: max wait for READY")
  p.add_argument("--dry-run", action="store_true", help="print the commands instead of running them")
  return p


def main(argv: list[str]) -> int:
  own, main_args = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
  a = _parser().parse_args(own)
  t = C.Tpu(a.name, a.zone, a.accelerator_type, a.version, a.project, a.spot, a.queued)
  if a.verb in ("setup", "babysit") and not a.repo:
    cli.fail(f"{a.verb} needs --repo=GIT_URL (the tinyjax repository to install on every worker)")
  if a.verb in ("run", "babysit") and not main_args:
    cli.fail(f"{a.verb} needs the training arguments after --, e.g. -- --config=configs/c4_50m.py --workdir=gs://B/R")
  r = Runner(a.dry_run)
  if a.verb == "babysit":
    return babysit(t, r, main_args, a.repo, a.ref, a.max_restarts, a.poll_s, a.ready_timeout_s, a.log_name)
  argv_by_verb = {
      "create": lambda: C.create(t), "delete": lambda: C.delete(t), "status": lambda: C.describe_state(t),
      "setup": lambda: C.ssh(t, C.setup_script(a.repo, a.ref, a.extras)),
      "run": lambda: C.ssh(t, C.run_script(main_args, a.log_name, a.detach)),
      "logs": lambda: C.ssh(t, C.logs_script(a.log_name, a.lines)), "ssh": lambda: C.ssh(t, None, a.worker),
  }
  return r.call(argv_by_verb[a.verb]())


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
