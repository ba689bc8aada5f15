"""The launchers' tests (test_tpu.py, test_slurm.py) run against fake gcloud / sbatch / srun / scontrol on PATH that
record their argv: the command lines pinned.

The fake gcloud plays a TPU VM: `describe` prints the next line of a states file (NOTFOUND = exit 1), the training
ssh exits with the next code of a run-codes file; everything else exits 0. The sbatch script is run by bash with a
fake srun that records its argv and SLURM environment (SLURM_* and TINYJAX_* variables; not the internal
_TINYJAX_PARENT_PID this test process carries) and exits with a chosen code.

Fixtures: fake (the fakes installed: .dir, .calls(), .set(states, rcs, queued, queued_exists)); preflights (autouse:
the launchers' preflight compile recorded and answered "fits").
"""
import json
import os
import stat
import sys

import pytest

from tinyjax import aot

FAKE_GCLOUD = r'''#!PYTHON
import json, os, sys
def pop(path, default):
  lines = open(path).read().split() if os.path.exists(path) else []
  if not lines:
    return default
  if len(lines) > 1:  # the last line stays: the VM keeps its state
    open(path, "w").write("\n".join(lines[1:]))
  return lines[0]
with open(os.environ["FAKE_LOG"], "a") as f:
  f.write(json.dumps(sys.argv[1:]) + "\n")
args = sys.argv[1:]
queued, exists = "queued-resources" in args, os.environ["FAKE_QUEUED_EXISTS"]
if "describe" in args:
  state = pop(os.environ["FAKE_QUEUED_STATES" if queued else "FAKE_STATES"], "ACTIVE" if queued else "READY")
  if state == "NOTFOUND":
    sys.exit(1)
  print(state)
elif queued and "create" in args:  # as the API: one queued resource per name
  if os.path.exists(exists):
    sys.exit("ERROR: (gcloud.compute.tpus.queued-resources.create) ALREADY_EXISTS: the resource already exists")
  open(exists, "w").close()
elif queued and "delete" in args and os.path.exists(exists):
  os.remove(exists)
elif "start" in args:  # a STOPPED node: FAKE_START_RC=1 plays one that cannot be started (e.g. Spot)
  sys.exit(int(os.environ.get("FAKE_START_RC", "0")))
elif "ssh" in args and any("tinyjax.main" in a for a in args):
  sys.exit(int(pop(os.environ["FAKE_RUN_RCS"], "0")))
'''

FAKE_RECORDER = r'''#!PYTHON
import json, os, sys
env = {k: v for k, v in os.environ.items() if k.startswith(("SLURM_", "TINYJAX_"))}  # not _TINYJAX_ (internal)
with open(os.environ["FAKE_LOG"], "a") as f:
  f.write(json.dumps({"prog": os.path.basename(sys.argv[0]), "argv": sys.argv[1:], "env": env}) + "\n")
if os.path.basename(sys.argv[0]) == "scontrol" and sys.argv[1:3] == ["show", "hostnames"]:
  print("gpu-node-07\ngpu-node-08")
if os.path.basename(sys.argv[0]) == "srun" and os.environ.get("FAKE_SRUN_EXEC"):
  cmd = [a for a in sys.argv[1:] if not a.startswith("--")]  # the task command after srun's options
  os.environ.update(SLURM_PROCID="1", SLURM_NTASKS="2", SLURM_LOCALID="0")
  os.execvp(cmd[0], cmd)
sys.exit(int(os.environ.get("FAKE_RC", "0")))
'''


def _install(bin_dir, name, source):
  path = bin_dir / name
  path.write_text(source.replace("PYTHON", sys.executable))
  path.chmod(path.stat().st_mode | stat.S_IXUSR)
  return str(path)


@pytest.fixture
def fake(tmp_path, monkeypatch):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  _install(bin_dir, "gcloud", FAKE_GCLOUD)
  for name in ("sbatch", "srun", "scontrol", "python-on-node"):
    _install(bin_dir, name, FAKE_RECORDER)
  log, states, rcs = tmp_path / "calls.jsonl", tmp_path / "states", tmp_path / "rcs"
  queued_states, queued_exists = tmp_path / "queued_states", tmp_path / "queued_exists"
  monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
  monkeypatch.setenv("FAKE_LOG", str(log))
  monkeypatch.setenv("FAKE_STATES", str(states))
  monkeypatch.setenv("FAKE_RUN_RCS", str(rcs))
  monkeypatch.setenv("FAKE_QUEUED_STATES", str(queued_states))
  monkeypatch.setenv("FAKE_QUEUED_EXISTS", str(queued_exists))

  class Fake:
    dir = bin_dir

    def calls(self):
      return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    def set(self, states_=(), rcs_=(), queued_=(), queued_exists_=False):
      states.write_text("\n".join(states_))
      rcs.write_text("\n".join(str(r) for r in rcs_))
      queued_states.write_text("\n".join(queued_))
      if queued_exists_:
        queued_exists.write_text("")
      elif queued_exists.exists():
        queued_exists.unlink()
  return Fake()


@pytest.fixture(autouse=True)
def preflights(monkeypatch):
  """The launchers' preflight compile (tinyjax/aot.py) recorded and answered "fits"; the preflight tests
  replace the answer or use the real compiler."""
  seen = []
  monkeypatch.setattr(aot, "preflight", lambda args, target: seen.append((target, args)) or f"{target}: fits")
  return seen
