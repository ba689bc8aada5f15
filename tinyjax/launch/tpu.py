"""TPU VM launcher: create | setup | run | status | logs | ssh | delete | babysit, over plain `gcloud`.

python -m tinyjax.launch.tpu VERB --name=NAME --zone=ZONE [--accelerator-type=v4-8] [--spot] [--queued]
                             [--dry-run] [VERB flags] [-- MAIN ARGS]
MAIN ARGS go unchanged to `python -m tinyjax.main` on every worker (--worker=all), e.g.
  -- --config=configs/c4_50m.py --workdir=gs://BUCKET/runs/c4_50m
On a slice each worker is one process; tinyjax.main's jax.distributed.initialize() finds the slice by itself.
babysit: ensure the VM is READY (create it; when PREEMPTED/TERMINATED, or its queued resource SUSPENDED/FAILED, delete
and recreate it; when STOPPED, start it, or recreate it if it will not start; a queued request waiting for capacity is
waited for), run setup after each (re)creation, run, and
after a preemption (the run fails and the VM is no longer READY; or tinyjax exits 75, or 4 for a lost host; or ssh
drops, 255) do it again, at most --max-restarts times; tinyjax resumes from the workdir's latest checkpoint.
Exit codes: the run's own (0 when it finished); 69 when no READY VM came within --ready-timeout-s (one line).
Preflight: create (given MAIN ARGS), run and babysit first compile the run for --accelerator-type with libtpu
(tinyjax/aot.py, pip install -e '.[tpu-compile]') and refuse, one line and exit 2, a run that cannot fit, before any
gcloud command; --skip-preflight launches without it.
"""
from __future__ import annotations

import shlex
import subprocess
import sys
import time

from tinyjax import cli, errors
from tinyjax.launch import commands as C

DEAD_STATES = ("PREEMPTED", "TERMINATED")  # a node that will not come back: delete and recreate it
STOPPED_STATES = ("STOPPED",)  # stopped (by a person, a script, ...): start it; one that will not start is recreated
# Queued resources (QueuedResourceState.State): a request still waiting for capacity is left alone (a second
# `create` fails with ALREADY_EXISTS); a spent one gives no node again (SUSPENDED: its Spot node was reclaimed and
# deleted; FAILED: it stays so until deleted) and is deleted and queued anew. SUSPENDING, DELETING and ACTIVE
# without a READY node are waited out.
QUEUED_WAITING = ("CREATING", "ACCEPTED", "WAITING_FOR_RESOURCES", "PROVISIONING")
QUEUED_SPENT = ("SUSPENDED", "FAILED")
SSH_FAILED = 255  # ssh's own failure code (a reclaimed VM drops the connection)
RERUN_CODES = (errors.EXIT_PREEMPTED, errors.EXIT_LOST_HOST, SSH_FAILED)  # rerun even on a READY VM: the rerun resumes


def preflight(main_args: list[str], target: str, skip: bool) -> None:
  """Before anything is created or launched: the run compiled for the hardware it is about to get (tinyjax/aot.py);
  one that cannot fit, or no compiler to tell, is one line and exit 2 (--skip-preflight launches anyway)."""
  if skip:
    say(f"preflight for {target} skipped (--skip-preflight)")
    return
  from tinyjax import config
  from tinyjax import aot  # noqa: PLC0415 - the compile runs in a child process
  say(f"preflight: compiling the train step for {target} with its own compiler ...")
  try:
    say(aot.preflight(main_args, target))
  except config.ConfigError as e:
    cli.fail(str(e))


class NotReady(Exception):
  """No READY VM within the ready timeout."""


def say(message: str) -> None:
  print(f"tinyjax.launch: {message}", file=sys.stderr, flush=True)


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

  def output(self, argv: list[str], dry: str = "READY") -> tuple[int, str]:
    if self.dry_run:
      print(shlex.join(argv), flush=True)
      return 0, dry
    r = subprocess.run(argv, capture_output=True, text=True)
    return r.returncode, r.stdout.strip()


def _last_line(rc: int, out: str) -> str | None:
  return out.splitlines()[-1] if rc == 0 and out else None


def state(t: C.Tpu, runner: Runner) -> str | None:
  """The node's state, None when there is no node."""
  return _last_line(*runner.output(C.describe_state(t)))


def queued_state(t: C.Tpu, runner: Runner) -> str | None:
  """The queued resource's state, None when there is no queued resource."""
  return _last_line(*runner.output(C.describe_queued_state(t), dry="ACTIVE"))


def next_action(t: C.Tpu, runner: Runner) -> tuple[str, str]:
  """(action, what was seen): "ready", "wait", "create" (nothing there) or "recreate" (delete, then create)."""
  if t.queued:
    queued = queued_state(t, runner)
    if queued is None:
      return "create", "no queued resource"
    if queued in QUEUED_SPENT:
      return "recreate", f"queued resource {queued}"
    if queued != "ACTIVE":
      return "wait", f"queued resource {queued}" + (" (waiting for capacity)" if queued in QUEUED_WAITING else "")
  node = state(t, runner)
  if node == "READY":
    return "ready", "READY"
  if node in DEAD_STATES:
    return "recreate", f"node {node}"
  if node in STOPPED_STATES:
    return "start", f"node {node}"
  if node is None and not t.queued:
    return "create", "no node"
  return "wait", f"node {node or 'not created yet'}"


def ensure_ready(t: C.Tpu, runner: Runner, poll_s: float, timeout_s: float, sleep=time.sleep,
                 clock=time.monotonic) -> bool:
  """Blocks until the node is READY, creating it (again) as needed; returns whether it was (re)created. Raises
  NotReady after timeout_s."""
  created, deadline, seen = False, clock() + timeout_s, None
  while True:
    action, what = next_action(t, runner)
    if action == "ready":
      return created
    if what != seen:  # one line per change, not per poll
      say(f"{t.name}: {what}" + {"recreate": ": deleting it to create it again", "create": ": creating it",
                                  "start": ": starting it"}.get(action, ""))
      seen = what
    if action == "start":
      created = True  # setup runs again (idempotent): the disk kept the checkout, but maybe not all of it
      if runner.call(C.start(t)) != 0:
        say(f"starting {t.name} failed: deleting it to create it again")
        action = "recreate"
    if action == "recreate":
      runner.call(C.delete(t))
    if action in ("create", "recreate"):
      if runner.call(C.create(t)) != 0:  # e.g. no capacity right now (not queued): try again after poll_s
        say(f"creating {t.name} failed; retrying in {poll_s:.0f} s")
      created = True
    if clock() >= deadline:
      raise NotReady(f"{t.name} is not READY after --ready-timeout-s={timeout_s:.0f} (last seen: {what}); rerun "
                     "babysit to keep waiting (a run resumes from its checkpoint)")
    sleep(poll_s)


def babysit(t: C.Tpu, runner: Runner, main_args: list[str], repo: str, ref: str, max_restarts: int,
            poll_s: float = 30.0, timeout_s: float = 3600.0, log_name: str = "run", sleep=time.sleep,
            clock=time.monotonic, extras: str = "tpu,gcs") -> int:
  """Runs main_args on the VM until it finishes, recreating the VM and rerunning after each preemption or lost
  host. Returns the run's exit code, or errors.EXIT_NOT_READY (one line) when no READY VM came within timeout_s."""
  restarts, set_up = 0, False
  while True:
    try:
      fresh = ensure_ready(t, runner, poll_s, timeout_s, sleep, clock)
    except NotReady as e:
      print(f"tinyjax.launch: error: {e}", file=sys.stderr, flush=True)
      return errors.EXIT_NOT_READY
    rc = 0
    if fresh or not set_up:  # a failed setup is decided on like a failed run (a dropped ssh: 255)
      rc = runner.call(C.ssh(t, C.setup_script(repo, ref, extras)))
      set_up = rc == 0
    if set_up:
      rc = runner.call(C.ssh(t, C.run_script(main_args, log_name)))
    if rc == 0 or runner.dry_run:
      say(f"{t.name}: run finished")
      return rc
    action, now = next_action(t, runner)
    what = "setup" if not set_up else "run"
    if action == "ready" and rc not in RERUN_CODES:
      say(f"{what} failed with exit code {rc} on a READY VM: not retrying")
      return rc
    restarts += 1
    if restarts > max_restarts:
      say(f"giving up after {max_restarts} restarts ({what} exit code {rc}, VM {now})")
      return rc
    say(f"restart {restarts}/{max_restarts}: {what} exit code {rc}, VM {now}")


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
  p.add_argument("--extras", default="tpu,gcs", help="setup/babysit: pip extras to install")
  p.add_argument("--log-name", default="run", help="run/logs: log file ~/tinyjax_logs/NAME-<host>.log")
  p.add_argument("--detach", action="store_true", help="run: start in the background and return")
  p.add_argument("--lines", type=int, default=50, help="logs: lines per worker")
  p.add_argument("--worker", default="0", help="ssh: worker index (or all)")
  p.add_argument("--max-restarts", type=int, default=20, help="babysit: recreations/reruns before giving up")
  p.add_argument("--poll-s", type=float, default=30.0, help="babysit: seconds between state checks")
  p.add_argument("--ready-timeout-s", type=float, default=3600.0, help="babysit: max wait for READY")
  p.add_argument("--dry-run", action="store_true", help="print the commands instead of running them")
  p.add_argument("--skip-preflight", action="store_true",
                 help="create/run/babysit without first compiling the run for --accelerator-type")
  return p


def main(argv: list[str]) -> int:
  own, main_args = C.split_at_dashes(argv)
  a = _parser().parse_args(own)
  t = C.Tpu(a.name, a.zone, a.accelerator_type, a.version, a.project, a.spot, a.queued)
  if a.verb in ("setup", "babysit") and not a.repo:
    cli.fail(f"{a.verb} needs --repo=GIT_URL (the tinyjax repository to install on every worker)")
  if a.verb in ("run", "babysit") and not main_args:
    cli.fail(f"{a.verb} needs the training arguments after --, e.g. -- --config=configs/c4_50m.py --workdir=gs://B/R")
  for flag, value in (("max-restarts", a.max_restarts), ("poll-s", a.poll_s), ("ready-timeout-s", a.ready_timeout_s)):
    if value < 0:
      cli.fail(f"--{flag}={value} is invalid: must be >= 0")
  if a.verb in ("create", "run", "babysit") and main_args:  # create: only when told what will run (-- MAIN ARGS)
    preflight(main_args, a.accelerator_type, a.skip_preflight)
  r = Runner(a.dry_run)
  if a.verb == "status" and t.queued:  # the request's state (WAITING_FOR_RESOURCES, ACTIVE, SUSPENDED, ...), then
    rc = r.call(C.describe_queued_state(t))  # its node's, once there is one
    return rc or r.call(C.describe_state(t))
  if a.verb == "babysit":
    return babysit(t, r, main_args, a.repo, a.ref, a.max_restarts, a.poll_s, a.ready_timeout_s, a.log_name,
                   extras=a.extras)
  argv_by_verb = {
      "create": lambda: C.create(t), "delete": lambda: C.delete(t), "status": lambda: C.describe_state(t),
      "setup": lambda: C.ssh(t, C.setup_script(a.repo, a.ref, a.extras)),
      "run": lambda: C.ssh(t, C.run_script(main_args, a.log_name, a.detach)),
      "logs": lambda: C.ssh(t, C.logs_script(a.log_name, a.lines)), "ssh": lambda: C.ssh(t, None, a.worker),
  }
  return r.call(argv_by_verb[a.verb]())


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
