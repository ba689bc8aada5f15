"""A signal during setup exits 75 with one line; data-build workers die with their parent (audit item 13)."""
import json
import os
import signal
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_sigterm_during_setup_exits_75_with_one_line(tmp_path):
  proc = subprocess.Popen([sys.executable, "-m", "tinyjax.main", "--config=configs/tiny.py",
                           "--config.train.num_train_steps=4", "--config.model.num_layers=1",
                           f"--workdir={tmp_path / 'w'}"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.stdout.readline().startswith("env: ")  # printed after the handlers are in place, before any step
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 75, err[-2000:]
  assert err.strip().splitlines() == ["tinyjax: stopped by SIGTERM during setup, before any step; rerun to start"]
  lock = tmp_path / "w" / ".tinyjax.lock"  # released on the way out; a signal landing inside acquire() itself can
  if lock.exists():  # leave it, but then it names the exited pid: stale, taken over by the rerun
    assert json.loads(lock.read_text())["pid"] == proc.pid
  assert "step 1/4" not in out


def test_build_workers_are_killed_with_their_parent():
  code = ("import ctypes, os; from tinyjax import builder; builder._die_with_parent(); "
          "libc = ctypes.CDLL('libc.so.6'); sig = ctypes.c_int(); libc.prctl(2, ctypes.byref(sig)); print(sig.value)")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
  assert out.strip() == str(int(signal.SIGKILL))  # PR_GET_PDEATHSIG: the kernel kills it when the parent dies
