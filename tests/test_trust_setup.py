"""A signal during setup exits 75 with one line (audit item 13; workers and other phases: test_signals.py)."""
import json
import os
import signal
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_stop_signal_during_setup_exits_75_with_one_line(tmp_path, sig):
  proc = subprocess.Popen([sys.executable, "-m", "tinyjax.main", "--config=configs/tiny.py",
                           "--config.train.num_train_steps=4", "--config.model.num_layers=1",
                           f"--workdir={tmp_path / 'w'}"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.stdout.readline().startswith("env: ")  # printed after the handlers are in place, before any step
  proc.send_signal(sig)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 75, err[-2000:]
  assert err.strip().splitlines() == [f"tinyjax: stopped by {sig.name} during setup, before any step; rerun the same "
                                      "command to continue"]
  lock = tmp_path / "w" / ".tinyjax.lock"  # released on the way out, unless the stop came after SETUP_GRACE_S
  if lock.exists():  # without a safe point (e.g. in a long tokenizer training): then it names the exited pid
    assert json.loads(lock.read_text())["pid"] == proc.pid
  assert "step 1/4" not in out


