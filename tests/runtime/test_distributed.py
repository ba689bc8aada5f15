"""The supervisor of a multi-process run (distributed.supervise): JAX's C++ abort for a lost peer becomes one line and
exit 4; everything else (exit codes, deaths by signal, native log lines, signals sent to the run) passes through.
The trainers' own lost-host exits are in test_distributed_processes.py."""
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from tinyjax import errors

# What jaxlib 0.10.2 printed when it aborted process 0 after process 1 stopped sending heartbeats (abridged: the
# full report also holds the stack trace and faulthandler's dump).
JAX_ABORT = (b"E1202 07:36:40.656894   20047 coordination_service.cc:1549] [115] Use error polling to propagate the "
             b"following error to all tasks: UNAVAILABLE: The following tasks are unhealthy (stopped sending "
             b"heartbeats):\n1\nThe tasks have crashed.\n"
             b"F1202 07:36:40.658760   20058 client.h:80] Terminating process because the JAX distributed service "
             b"detected fatal errors. This most likely indicates that another task died\n"
             b"*** Check failure stack trace: ***\n    @     0x7fa88d040634  absl::log_internal::LogMessage::Flush()\n")
NATIVE_WARNING = b"W1202 07:36:13.957895   19515 cpu_client.cc:10] an ordinary warning of XLA's\n"
# The trainer stand-in: supervise() forks and returns in the child, which then does what argv[1] says.
CHILD = f"""
import os, signal, sys, time
from tinyjax.runtime import distributed
distributed.supervise(0, 2)
what = sys.argv[1]
if what == "jax_abort":
  os.write(2, {JAX_ABORT!r})
  os.abort()
if what == "jax_abort_segv":  # the abort overtaken by a crash of another thread (an Orbax save in flight)
  os.write(2, {JAX_ABORT!r})
  signal.signal(signal.SIGSEGV, signal.SIG_DFL)
  os.kill(os.getpid(), signal.SIGSEGV)
if what == "crash":  # an abort that is not JAX's lost-peer report
  os.write(2, {NATIVE_WARNING!r})
  os.abort()
if what == "oom_killed":  # the kernel's OOM killer (or kill -9) takes the trainer, not its supervisor
  os.write(2, {NATIVE_WARNING!r})
  os.kill(os.getpid(), signal.SIGKILL)
if what == "stop":  # a SIGHUP re-sent as SIGTERM to JAX's preemption notifier, then the checkpoint and exit 75
  os.write(2, b"W1207 23:57:39.266022   13822 preemption_notifier.cc:90] SIGTERM caught at 2026-12-07T23:57:39+00:00\\n")
  print("tinyjax: stopped by SIGHUP at step 8; checkpoint written, rerun to resume", file=sys.stderr)
  sys.exit(75)
if what == "exit3":
  os.write(2, {NATIVE_WARNING!r})
  print("tinyjax: diverged: non-finite loss at step 7", file=sys.stderr)
  sys.exit(3)
if what == "signals":
  signal.signal(signal.SIGTERM, lambda s, f: (print("child got SIGTERM", flush=True), sys.exit(75)))
  print("child", os.getpid(), flush=True)
  time.sleep(60)
"""


@pytest.fixture
def supervised(run_program):
  """supervised(what): the trainer stand-in under distributed.supervise (stdout and stderr piped, text)."""
  return lambda what: run_program(what, code=CHILD, popen=True)


@pytest.mark.parametrize("what", ["jax_abort", "jax_abort_segv"])
def test_jax_abort_for_a_lost_peer_is_one_line_and_exit_4_with_the_report_kept(supervised, what):
  p = supervised(what)
  out, err = p.communicate(timeout=120)
  lines = err.splitlines()
  assert p.returncode == errors.EXIT_LOST_HOST and len(lines) == 1, (p.returncode, err)
  assert lines[0].startswith("tinyjax: error: lost host: process 0 of 2: process 1 stopped sending heartbeats "
                             "to JAX's coordination service (JAX's report: "), lines
  report = lines[0].split("JAX's report: ")[1].split(")")[0]
  with open(report, "rb") as f:
    assert f.read() == JAX_ABORT  # nothing lost: the console got one line, the file has JAX's own words
  os.remove(report)


def test_a_trainer_killed_by_sigkill_is_one_line_and_the_supervisor_dies_of_sigkill(supervised, child_env, repo):
  """Before: signal.signal(SIGKILL, SIG_DFL) raised OSError in the supervisor: a 24-line traceback and exit 1."""
  p = supervised("oom_killed")
  _, err = p.communicate(timeout=120)
  assert p.returncode == -signal.SIGKILL, (p.returncode, err)  # the shell's 128 + 9 = 137, as if it were the trainer
  assert err == NATIVE_WARNING.decode() + (
      "tinyjax: error: process 0 of 2: the trainer was killed by SIGKILL (the kernel's out-of-memory killer, or kill "
      "-9); exiting with code 137 (rerun the same command to resume from the last checkpoint)\n"), err
  shell = subprocess.run(["sh", "-c", f"{sys.executable} -c \"$0\" oom_killed; echo $?", CHILD], capture_output=True,
                         text=True, timeout=120, env=child_env(), cwd=repo, check=False)
  assert shell.stdout == "137\n", (shell.stdout, shell.stderr)


def test_a_stop_is_the_one_line_without_jaxs_notice_before_it(supervised):
  """Measured by benchmarks.chaos: JAX's notifier line came before tinyjax's own on a multi-process stop."""
  p = supervised("stop")
  _, err = p.communicate(timeout=120)
  assert p.returncode == 75 and err == "tinyjax: stopped by SIGHUP at step 8; checkpoint written, rerun to resume\n", err


@pytest.mark.slow
def test_other_ends_pass_through_unchanged(supervised):
  crash = supervised("crash")
  _, err = crash.communicate(timeout=120)
  assert crash.returncode == -signal.SIGABRT and err == NATIVE_WARNING.decode(), (crash.returncode, err)
  exit3 = supervised("exit3")
  _, err = exit3.communicate(timeout=120)
  assert exit3.returncode == 3, (exit3.returncode, err)
  assert err == NATIVE_WARNING.decode() + "tinyjax: diverged: non-finite loss at step 7\n", err  # in order, none lost


# A supervisor slow to reach its signal handlers after the fork (CI: the trainer printed its first line before them).
EARLY = """
import os, signal, sys, time
from tinyjax.runtime import distributed
forked = distributed.faults.forked
def slow_supervisor(child):
  forked(child=child)
  if not child:
    time.sleep(1)
distributed.faults.forked = slow_supervisor
distributed.supervise(0, 2)
signal.signal(signal.SIGTERM, lambda s, f: (print("child got SIGTERM", flush=True), sys.exit(75)))
os.kill(os.getppid(), signal.SIGTERM)
time.sleep(60)
"""


def test_a_signal_before_the_supervisors_handlers_still_reaches_the_trainer(run_program):
  """Before: the supervisor died of the SIGTERM (-15) and the trainer ran on without its notice."""
  p = run_program(code=EARLY, timeout=60)
  assert p.returncode == 75 and p.stdout == "child got SIGTERM\n", (p.returncode, p.stdout, p.stderr)


@pytest.mark.slow
def test_signals_reach_the_trainer_and_it_dies_with_its_supervisor(supervised):
  p = supervised("signals")
  child = int(p.stdout.readline().split()[1])
  p.send_signal(signal.SIGTERM)  # a preemption notice goes to the process the launcher started
  assert p.wait(timeout=60) == 75 and p.stdout.read() == "child got SIGTERM\n"
  p = supervised("signals")
  child = int(p.stdout.readline().split()[1])
  p.kill()  # the host is gone: the trainer must not outlive the process the launcher sees
  p.wait()
  deadline = time.monotonic() + 10
  while os.path.exists(f"/proc/{child}") and open(f"/proc/{child}/stat").read().split()[2] != "Z":
    assert time.monotonic() < deadline, "the trainer outlived its killed supervisor"
    time.sleep(0.05)


# Two real jax.distributed processes, idle (no collective in flight): only JAX's coordination service can notice
# a lost peer, and it aborts the survivor, which must still end in one line and exit 4.
IDLE = """
import sys, time
from tinyjax import config, env
from tinyjax.runtime import distributed
env.apply(config.base().env)  # as main does first (without it JAX's plugins print their own lines)
d = config.base().distributed
d.coordinator_address, d.num_processes, d.process_id = sys.argv[1], 2, int(sys.argv[2])
d.heartbeat_timeout_s = 10  # the test's bound; the default (100 s) is the same path, 90 s slower
distributed.initialize(d)
import jax
jax.devices()
print("ready", flush=True)
time.sleep(600)
"""


@pytest.mark.slow
@pytest.mark.parametrize("victim,bound_s", [(1, 10 + 10), (0, 10)])
def test_a_peer_lost_outside_any_collective_is_one_line_and_exit_4(run_program, victim, bound_s):
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    address = f"127.0.0.1:{s.getsockname()[1]}"
  procs = [run_program(address, i, code=IDLE, popen=True) for i in (0, 1)]
  try:
    assert [p.stdout.readline() for p in procs] == ["ready\n", "ready\n"]
    killed = time.monotonic()
    procs[victim].kill()
    survivor = procs[1 - victim]
    rc, err = survivor.wait(timeout=120), survivor.stderr.read()
    elapsed = time.monotonic() - killed
    assert rc == errors.EXIT_LOST_HOST and len(err.splitlines()) == 1, (rc, err)
    expected = ("the coordinator (process 0) stopped answering" if victim == 0 else
                "process 1 stopped sending heartbeats")
    assert err.startswith(f"tinyjax: error: lost host: process {1 - victim} of 2: {expected}"), err
    assert elapsed <= bound_s, elapsed
    os.remove(err.split("JAX's report: ")[1].split(")")[0])
  finally:
    for p in procs:
      p.kill()
      p.wait()
