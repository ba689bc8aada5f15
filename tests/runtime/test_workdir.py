"""The workdir lock (tinyjax/runtime/workdir.py): a second trainer is refused and a dead one's stale lock taken over;
under contention, processes acquiring at the same instant, on a fresh directory and over a lock left by a dead
trainer, never give two holders (the contenders import only tinyjax.runtime.workdir, no jax: ~3 s in all)."""
import multiprocessing
import os
import socket
import subprocess
import sys
import time

import pytest

from tinyjax import config
from tinyjax.runtime import workdir as workdirs

ROUNDS, CONTENDERS = 200, 4
HELD, REFUSED, OTHER = 1, 2, 3


def _contend(me, dirs, barrier, outcome):
  """One contender: in every round, all try to take the lock of that round's directory at once (barrier)."""
  for r, d in enumerate(dirs):
    lock = workdirs.Lock(d, d)
    barrier.wait()
    try:
      lock.acquire()
      result = HELD if lock.held else OTHER
    except config.ConfigError:
      result = REFUSED
    except Exception:  # noqa: BLE001 - anything else (e.g. FileNotFoundError from a racing remove) is a failure
      result = OTHER
    outcome[r * CONTENDERS + me] = result
    barrier.wait()  # every contender has tried before the holder lets go
    lock.release()


def _dead_pid():
  proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                        check=True)
  return int(proc.stdout)


@pytest.mark.parametrize("stale", [False, True], ids=["fresh-directory", "over-a-stale-lock"])
def test_simultaneous_acquires_give_exactly_one_holder(tmp_path, stale):
  dirs = []
  dead = _dead_pid()
  for r in range(ROUNDS):
    d = tmp_path / str(r)
    d.mkdir()
    if stale:  # left by a trainer killed with kill -9 on this host
      (d / workdirs.LOCK).write_text(f'{{"host": "{socket.gethostname()}", "pid": {dead}, "since": "before"}}')
    dirs.append(str(d))
  ctx = multiprocessing.get_context("spawn")
  barrier, outcome = ctx.Barrier(CONTENDERS), ctx.Array("b", ROUNDS * CONTENDERS)
  procs = [ctx.Process(target=_contend, args=(i, dirs, barrier, outcome)) for i in range(CONTENDERS)]
  for p in procs:
    p.start()
  for p in procs:
    p.join(120)
  assert [p.exitcode for p in procs] == [0] * CONTENDERS
  rounds = [list(outcome[r * CONTENDERS:(r + 1) * CONTENDERS]) for r in range(ROUNDS)]
  bad = [(r, o) for r, o in enumerate(rounds) if sorted(o) != [HELD] + [REFUSED] * (CONTENDERS - 1)]
  assert not bad, f"{len(bad)} of {ROUNDS} rounds without exactly one holder (1 held, 2 refused, 3 error): {bad[:5]}"
  assert not any(os.path.exists(os.path.join(d, workdirs.LOCK)) for d in dirs)  # every holder released it


@pytest.mark.slow  # two trainer processes (~15 s on 2 cores)
def test_a_second_trainer_is_refused_and_a_stale_lock_is_taken_over(small_args, run_program, rows, tmp_path):
  args = [*small_args, f"--workdir={tmp_path}", "--config.train.num_train_steps=100000"]
  first = run_program(*args, popen=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 240
    while not rows(tmp_path) and time.time() < deadline:
      time.sleep(0.2)
    second = run_program(*args, timeout=240)
    assert second.returncode == 2 and "in use by another tinyjax run" in second.stderr, second.stderr[-2000:]
    assert rows(tmp_path), "the refused trainer must not touch the running one's files"
  finally:
    first.kill()  # kill -9: the lock stays behind, stale
    first.wait()
  assert (tmp_path / workdirs.LOCK).exists()
  lock = workdirs.Lock(str(tmp_path), str(tmp_path))
  lock.acquire()
  assert lock.held
  lock.release()
  assert not (tmp_path / workdirs.LOCK).exists()
