"""tinyjax.launch.tpu (and launch.commands' TPU command lines) against the fake gcloud of conftest.py: create, setup,
run, status, the babysitter, the preflight compile, and the generated setup script on a Python 3.10 image (slow)."""
import glob
import hashlib
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tarfile

import pytest

from tinyjax import aot, errors
from tinyjax.hardware import targets
from tinyjax.launch import commands as C, tpu

REAL_PREFLIGHT = aot.preflight
BASE = ["--name=tj", "--zone=us-central2-b", "--accelerator-type=v4-16"]
MAIN = ["--config=configs/c4_50m.py", "--config.train.train_batch_size=64", "--workdir=gs://bkt/runs/a b"]


def test_create_on_demand_spot_queued(fake):
  assert tpu.main(["create", *BASE]) == 0
  assert tpu.main(["create", *BASE, "--spot", "--project=p1"]) == 0
  assert tpu.main(["create", *BASE, "--queued", "--spot", "--version=v2-alpha-tpuv4"]) == 0
  assert tpu.main(["delete", *BASE, "--queued"]) == 0
  assert fake.calls() == [
      ["compute", "tpus", "tpu-vm", "create", "tj", "--zone=us-central2-b", "--accelerator-type=v4-16",
       "--version=tpu-ubuntu2204-base"],
      ["compute", "tpus", "tpu-vm", "create", "tj", "--zone=us-central2-b", "--project=p1",
       "--accelerator-type=v4-16", "--version=tpu-ubuntu2204-base", "--spot"],
      ["compute", "tpus", "queued-resources", "create", "tj", "--node-id=tj", "--zone=us-central2-b",
       "--accelerator-type=v4-16", "--runtime-version=v2-alpha-tpuv4", "--spot"],
      ["compute", "tpus", "queued-resources", "delete", "tj", "--zone=us-central2-b", "--force", "--quiet"],
  ]


def test_setup_and_run_use_every_worker(fake):
  assert tpu.main(["setup", *BASE, "--repo=https://example.com/tinyjax.git", "--ref=v1"]) == 0
  assert tpu.main(["run", *BASE, "--", *MAIN]) == 0
  setup, run = fake.calls()
  assert setup[:7] == ["compute", "tpus", "tpu-vm", "ssh", "tj", "--zone=us-central2-b", "--worker=all"]
  script = setup[7].removeprefix("--command=")
  assert "git clone --quiet https://example.com/tinyjax.git ~/tinyjax" in script
  assert "git fetch --quiet origin v1" in script and "-e '.[tpu,gcs]'" in script
  assert "if [ ! -d ~/tinyjax/.git ]" in script and "uv venv --quiet --python 3.11 .venv" in script
  assert run[6] == "--worker=all"
  cmd = run[7].removeprefix("--command=")
  # the training arguments reach every worker unchanged (the workdir with a space stays one argument)
  assert (".venv/bin/python -m tinyjax.main --config=configs/c4_50m.py --config.train.train_batch_size=64 "
          "'--workdir=gs://bkt/runs/a b' 2>&1 | tee -a ~/tinyjax_logs/run-$(hostname).log") in cmd
  assert "set -o pipefail" in cmd


def test_status_logs_ssh_and_dry_run(fake, capsys):
  fake.set(["READY"])
  assert tpu.main(["status", *BASE]) == 0
  assert tpu.main(["logs", *BASE, "--lines=7"]) == 0
  assert tpu.main(["ssh", *BASE, "--worker=1"]) == 0
  assert [c[3:] for c in fake.calls()] == [
      ["describe", "tj", "--zone=us-central2-b", "--format=value(state)"],
      ["ssh", "tj", "--zone=us-central2-b", "--worker=all", "--command=tail -n 7 ~/tinyjax_logs/run-*.log"],
      ["ssh", "tj", "--zone=us-central2-b", "--worker=1"],
  ]
  capsys.readouterr()
  assert tpu.main(["run", *BASE, "--dry-run", "--", *MAIN]) == 0
  printed = capsys.readouterr().out.strip()
  assert len(fake.calls()) == 3, "--dry-run runs nothing"
  assert shlex.split(printed) == C.ssh(C.Tpu("tj", "us-central2-b", "v4-16"), C.run_script(MAIN))


def test_babysitter_recreates_after_preemption(fake):
  # READY -> the run dies with the VM (ssh 255) -> PREEMPTED: delete, create, CREATING, READY, setup, rerun -> 0
  fake.set(["READY", "PREEMPTED", "PREEMPTED", "CREATING", "READY"], [255, 0])
  sleeps = []
  t = C.Tpu("tj", "us-central2-b", "v4-16", spot=True)
  rc = tpu.babysit(t, tpu.Runner(False), MAIN, "https://example.com/tinyjax.git", "main", max_restarts=3,
                   poll_s=5, sleep=sleeps.append)
  assert rc == 0
  verbs = [(c[2], c[3]) if c[2] != "tpu-vm" or c[3] != "ssh" else ("ssh", "run" if "tinyjax.main" in c[-1]
                                                                    else "setup") for c in fake.calls()]
  assert verbs == [("tpu-vm", "describe"), ("ssh", "setup"), ("ssh", "run"), ("tpu-vm", "describe"),
                   ("tpu-vm", "describe"), ("tpu-vm", "delete"), ("tpu-vm", "create"), ("tpu-vm", "describe"),
                   ("tpu-vm", "describe"), ("ssh", "setup"), ("ssh", "run")]
  create = fake.calls()[6]
  assert "--spot" in create
  runs = [c for c in fake.calls() if c[3] == "ssh" and "tinyjax.main" in c[-1]]
  assert runs[0] == runs[1], "the same command is rerun; the workdir's checkpoint resumes it"
  assert sleeps == [5, 5]


@pytest.mark.parametrize("start_rc", [0, 1], ids=["started", "recreated"])
def test_babysit_starts_a_stopped_node_or_recreates_it_and_resumes_the_run(fake, monkeypatch, start_rc):
  """Before: a STOPPED node was waited on forever (no state but READY, dead or absent was acted on)."""
  monkeypatch.setenv("FAKE_START_RC", str(start_rc))
  # the run dies as the node is stopped (ssh 255) -> STOPPED: start it (or, failing that, delete and create it) ->
  # STARTING/CREATING -> READY: setup again, the same run command -> resumes, finishes
  fake.set(["READY", "STOPPED", "STOPPED", "STARTING", "READY"], [255, 0])
  t = C.Tpu("tj", "us-central2-b", "v4-16")
  assert tpu.babysit(t, tpu.Runner(False), MAIN, "r", "main", max_restarts=3, poll_s=5, sleep=lambda s: None) == 0
  recovery = [("tpu-vm", "start")] + ([("tpu-vm", "delete"), ("tpu-vm", "create")] if start_rc else [])
  assert _steps(fake.calls()) == [("tpu-vm", "describe"), ("ssh", "setup"), ("ssh", "run"), ("tpu-vm", "describe"),
                                  ("tpu-vm", "describe"), *recovery, ("tpu-vm", "describe"), ("tpu-vm", "describe"),
                                  ("ssh", "setup"), ("ssh", "run")]
  start = next(c for c in fake.calls() if c[3] == "start")
  assert start[2:] == ["tpu-vm", "start", "tj", "--zone=us-central2-b"]
  runs = [c for c in fake.calls() if c[3] == "ssh" and "tinyjax.main" in c[-1]]
  assert runs[0] == runs[1], "the same command is rerun; the workdir's checkpoint resumes it"


def test_babysitter_reruns_exit_75_and_stops_on_a_real_failure(fake):
  t = C.Tpu("tj", "z")
  fake.set(["READY"], [75, 75, 0])  # maintenance SIGTERM: checkpointed and exited 75 on a VM that stays READY
  assert tpu.babysit(t, tpu.Runner(False), MAIN, "r", "main", max_restarts=5, sleep=lambda s: None) == 0
  assert sum("tinyjax.main" in c[-1] for c in fake.calls()) == 3
  fake.set(["READY"], [1])  # a crash on a healthy VM is not retried
  assert tpu.babysit(t, tpu.Runner(False), MAIN, "r", "main", max_restarts=5, sleep=lambda s: None) == 1
  fake.set(["READY"], [75, 75, 75])
  assert tpu.babysit(t, tpu.Runner(False), MAIN, "r", "main", max_restarts=1, sleep=lambda s: None) == 75


def _steps(calls):
  """Each gcloud call as (group, verb), ssh split into setup and run."""
  return [("ssh", "run" if "tinyjax.main" in c[-1] else "setup") if c[3] == "ssh" else (c[2], c[3]) for c in calls]


def test_babysit_queued_recovers_a_spot_preemption(fake, capsys):
  """ACTIVE + READY: setup, run -> the Spot node is reclaimed (ssh 255) and deleted, the queued resource SUSPENDED:
  delete it, queue it again (once: no create while it waits for capacity), WAITING_FOR_RESOURCES, PROVISIONING,
  ACTIVE + READY: setup on the new VM, the same run again, which resumes and finishes."""
  fake.set(states_=["READY", "READY"], rcs_=[255, 0], queued_exists_=True,
           queued_=["ACTIVE", "SUSPENDED", "SUSPENDED", "WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE"])
  sleeps = []
  t = C.Tpu("tj", "us-central2-b", "v4-16", spot=True, queued=True)
  rc = tpu.babysit(t, tpu.Runner(False), MAIN, "https://example.com/tinyjax.git", "main", max_restarts=3, poll_s=7,
                   sleep=sleeps.append)
  assert rc == 0
  assert _steps(fake.calls()) == [
      ("queued-resources", "describe"), ("tpu-vm", "describe"), ("ssh", "setup"), ("ssh", "run"),
      ("queued-resources", "describe"),  # SUSPENDED: the run's exit was a preemption
      ("queued-resources", "describe"), ("queued-resources", "delete"), ("queued-resources", "create"),
      ("queued-resources", "describe"), ("queued-resources", "describe"),  # waiting for capacity: no create
      ("queued-resources", "describe"), ("tpu-vm", "describe"), ("ssh", "setup"), ("ssh", "run")]
  calls = fake.calls()
  assert calls[6] == ["compute", "tpus", "queued-resources", "delete", "tj", "--zone=us-central2-b", "--force",
                      "--quiet"]
  assert calls[7][:6] == ["compute", "tpus", "queued-resources", "create", "tj", "--node-id=tj"] and "--spot" in calls[7]
  assert calls[0][-1] == "--format=value(state.state)"
  runs = [c for c in calls if c[3] == "ssh" and "tinyjax.main" in c[-1]]
  assert runs[0] == runs[1], "the same command is rerun; the workdir's checkpoint resumes it"
  assert sleeps == [7, 7, 7]
  err = capsys.readouterr().err
  assert "tj: queued resource SUSPENDED: deleting it to create it again" in err
  assert "tj: queued resource WAITING_FOR_RESOURCES (waiting for capacity)\n" in err
  assert "restart 1/3: run exit code 255, VM queued resource SUSPENDED" in err


def test_babysit_queued_waits_for_capacity_then_times_out_in_one_line(fake, capsys):
  """A request waiting for capacity is never re-created; no READY VM by --ready-timeout-s: one line, exit 69."""
  fake.set(queued_=["NOTFOUND", "WAITING_FOR_RESOURCES"])
  now = [0.0]
  sleep = lambda s: now.__setitem__(0, now[0] + s)
  t = C.Tpu("tj", "z", queued=True)
  rc = tpu.babysit(t, tpu.Runner(False), MAIN, "r", "main", max_restarts=3, poll_s=60, timeout_s=600, sleep=sleep,
                   clock=lambda: now[0])
  assert rc == errors.EXIT_NOT_READY == 69
  steps = _steps(fake.calls())
  assert steps.count(("queued-resources", "create")) == 1 and steps[:2] == [("queued-resources", "describe"),
                                                                            ("queued-resources", "create")]
  assert steps[2:] == [("queued-resources", "describe")] * 10 and now[0] == 600
  err = capsys.readouterr().err.strip().splitlines()
  assert err[-1] == ("tinyjax.launch: error: tj is not READY after --ready-timeout-s=600 (last seen: queued resource "
                     "WAITING_FOR_RESOURCES (waiting for capacity)); rerun babysit to keep waiting (a run resumes from "
                     "its checkpoint)")
  assert not any("Traceback" in line for line in err)
  assert err.count("tinyjax.launch: tj: queued resource WAITING_FOR_RESOURCES (waiting for capacity)") == 1, \
      "one line per state change, not one per poll"


def test_babysit_cli_ready_timeout_is_one_line_exit_69(fake, capfd):
  fake.set(["NOTFOUND"])
  rc = tpu.main(["babysit", *BASE, "--repo=r", "--ready-timeout-s=0", "--poll-s=0", "--", *MAIN])
  err = capfd.readouterr().err
  assert rc == 69 and err.strip().splitlines()[-1].startswith("tinyjax.launch: error: tj is not READY after")
  assert "Traceback" not in err
  fake.set(["READY"], queued_=["ACTIVE"])
  assert tpu.main(["status", *BASE, "--queued"]) == 0
  assert capfd.readouterr().out == "ACTIVE\nREADY\n"
  assert _steps(fake.calls()[-2:]) == [("queued-resources", "describe"), ("tpu-vm", "describe")]


def test_babysit_reruns_a_lost_host_on_a_ready_vm(fake):
  """Exit 4 (another worker's process is gone) on a VM that is READY again: rerun, which resumes."""
  fake.set(["READY"], [4, 0])
  t = C.Tpu("tj", "z")
  assert tpu.babysit(t, tpu.Runner(False), MAIN, "r", "main", max_restarts=2, sleep=lambda s: None) == 0
  assert _steps(fake.calls()).count(("ssh", "run")) == 2 and _steps(fake.calls()).count(("ssh", "setup")) == 1


def test_babysit_setup_failure_on_a_ready_vm_is_not_retried(fake, capsys):
  fake.set(["READY"])
  bad = fake.dir / "gcloud"
  bad.write_text(bad.read_text() + "if 'ssh' in args and 'git clone' in args[-1]:\n  sys.exit(1)\n")
  assert tpu.babysit(C.Tpu("tj", "z"), tpu.Runner(False), MAIN, "r", "main", max_restarts=2,
                     sleep=lambda s: None) == 1
  assert _steps(fake.calls()).count(("ssh", "run")) == 0
  assert "setup failed with exit code 1 on a READY VM: not retrying" in capsys.readouterr().err


@pytest.mark.parametrize("module, argv, message", [  # tinyjax.launch.slurm's: test_slurm.py
    (tpu, ["create", "--zone=z"], "the following arguments are required: --name"),
    (tpu, ["run", "--name=a", "--zone=z"], "run needs the training arguments after --"),
    (tpu, ["setup", "--name=a", "--zone=z"], "setup needs --repo=GIT_URL"),
    (tpu, ["reboot", "--name=a", "--zone=z"], "invalid choice: 'reboot'"),
])
def test_missing_arguments_are_one_line_exit_2(module, argv, message, capsys):
  with pytest.raises(SystemExit) as e:
    module.main(argv)
  err = capsys.readouterr().err.strip()
  assert e.value.code == 2 and len(err.splitlines()) == 1 and message in err


def test_babysit_dry_run_prints_one_round(fake, capsys):
  assert tpu.main(["babysit", *BASE, "--spot", "--repo=https://example.com/t.git", "--dry-run", "--", *MAIN]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert fake.calls() == []
  assert [shlex.split(line)[4] for line in lines] == ["describe", "ssh", "ssh"]  # VM READY: setup, then the run
  assert "--worker=all" in lines[2] and "tinyjax.main" in lines[2]


def _python_download(tmp_path) -> str:
  """A stand-in for uv's download of a standalone CPython: this interpreter's own installation (3.11, the project's
  Python) packed in python-build-standalone's install_only layout, listed in a downloads file uv reads through
  UV_PYTHON_DOWNLOADS_JSON_URL. Only the download source is replaced; uv unpacks, registers and uses it as on a VM."""
  base, stdlib = sys.base_prefix, sysconfig.get_path("stdlib")
  libpython = os.path.join(sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("INSTSONAME") or "")
  archive = tmp_path / "cpython.tar.gz"
  skip = ("site-packages", "test", "__pycache__", "idlelib", "tkinter")
  with tarfile.open(archive, "w:gz", compresslevel=1) as tar:
    tar.add(os.path.realpath(sys.executable), f"python/bin/python{sys.version_info[0]}.{sys.version_info[1]}")
    if os.path.isfile(libpython):
      tar.add(libpython, f"python/lib/{os.path.basename(libpython)}")
    tar.add(stdlib, f"python/{os.path.relpath(stdlib, base)}",
            filter=lambda info: None if os.path.basename(info.name) in skip else info)
  v = sys.version_info
  entry = {"name": "cpython", "arch": {"family": "x86_64", "variant": None}, "os": "linux", "libc": "gnu",
           "major": v.major, "minor": v.minor, "patch": v.micro, "prerelease": "", "url": archive.as_uri(),
           "sha256": hashlib.sha256(archive.read_bytes()).hexdigest(), "variant": None, "build": "standin"}
  listing = tmp_path / "python-downloads.json"
  listing.write_text(json.dumps({f"cpython-{v.major}.{v.minor}.{v.micro}-linux-x86_64-gnu": entry}))
  return listing.as_uri()


def _origin_repo(path) -> str:
  """A git repository shaped like tinyjax (pyproject with requires-python >= 3.11, the tpu/gcs extras) whose jax is
  a stand-in package, so that the install needs only setuptools from PyPI, not jax/libtpu's hundreds of MB."""
  (path / "tinyjax").mkdir(parents=True)
  (path / "jax").mkdir()
  (path / "tinyjax" / "__init__.py").write_text("")
  (path / "jax" / "__init__.py").write_text('__version__ = "0.10.2.standin"\n')
  (path / "pyproject.toml").write_text(
      '[build-system]\nrequires = ["setuptools>=68"]\nbuild-backend = "setuptools.build_meta"\n'
      '[project]\nname = "tinyjax"\nversion = "0.1.0"\nrequires-python = ">=3.11"\n'
      '[project.optional-dependencies]\ntpu = []\ngcs = []\n'
      '[tool.setuptools.packages.find]\ninclude = ["tinyjax*", "jax*"]\n')
  git = ["git", "-C", str(path), "-c", "user.name=t", "-c", "user.email=t@example.com"]
  for cmd in (["init", "--quiet", "--initial-branch=main"], ["add", "-A"], ["commit", "--quiet", "-m", "x"]):
    subprocess.run(git + cmd, check=True)
  return str(path)


def _real_python_310() -> str:
  """The executable of a Python 3.10 here: on PATH, or one of pyenv's (its shims need pyenv's own setup)."""
  root = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
  for found in [shutil.which("python3.10"), *sorted(glob.glob(f"{root}/versions/3.10*/bin/python3.10"))]:
    r = subprocess.run([found, "-c", "import sys; print(sys.executable)"], capture_output=True, text=True) \
        if found else None
    if r and r.returncode == 0:
      return r.stdout.strip()
  return ""


PYTHON_310 = _real_python_310()


@pytest.mark.slow
@pytest.mark.skipif(not PYTHON_310, reason="needs a Python 3.10 for the TPU image stand-in")
@pytest.mark.skipif(sys.platform != "linux" or platform.machine() != "x86_64", reason="a linux x86_64 CPython")
def test_setup_script_provisions_python_311_on_a_python_310_image(tmp_path):
  """The generated setup script, run by bash in a stand-in of the TPU image (python3 is 3.10, no other Python on
  PATH, a fresh home): pip installs uv from PyPI, uv installs CPython 3.11, the venv is 3.11, tinyjax installs.
  A venv an older setup left on 3.10 is replaced; a third run keeps the venv."""
  home, image_bin = tmp_path / "home", tmp_path / "image-bin"
  home.mkdir()
  image_bin.mkdir()
  os.symlink(PYTHON_310, image_bin / "python3")
  for tool in ("bash", "sh", "git", "rm", "env"):
    os.symlink(shutil.which(tool), image_bin / tool)
  env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "UV_", "PIP_"))}
  env.update(HOME=str(home), PATH=str(image_bin), UV_PYTHON_DOWNLOADS_JSON_URL=_python_download(tmp_path))
  script = C.setup_script(_origin_repo(tmp_path / "origin"), "main")
  image_python = subprocess.run(["python3", "--version"], env=env, capture_output=True, text=True).stdout
  assert image_python.startswith("Python 3.10."), image_python
  run = lambda: subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=300)
  venv_python = home / "tinyjax" / ".venv" / "bin" / "python"
  version = lambda: subprocess.run([str(venv_python), "-c", "import sys; print(sys.version_info[:2])"],
                                   capture_output=True, text=True).stdout.strip()
  first = run()
  assert first.returncode == 0, first.stderr[-3000:]
  assert f"python {platform.python_version()} jax 0.10.2.standin" in first.stdout
  assert version() == "(3, 11)"
  assert os.path.realpath(venv_python).startswith(str(home / ".local" / "share" / "uv" / "python")), \
      "the venv's Python is the one uv installed, not the image's"
  shutil.rmtree(venv_python.parent.parent)  # what the old setup left: a 3.10 venv
  subprocess.run([PYTHON_310, "-m", "venv", "--without-pip", str(venv_python.parent.parent)], check=True)
  assert version() == "(3, 10)"
  second = run()
  assert second.returncode == 0, second.stderr[-3000:]
  assert version() == "(3, 11)" and "python 3.11" in second.stdout
  marker = venv_python.parent.parent / "kept"
  marker.write_text("")
  third = run()
  assert third.returncode == 0 and marker.exists(), "an up-to-date venv is kept"


def _refuse(args, target):
  from tinyjax import config  # noqa: PLC0415
  raise config.ConfigError(f"{target} cannot hold this run: the train step needs 99.0 GiB per chip")


def test_preflight_compiles_for_the_slice_before_any_gcloud_command(fake, preflights, monkeypatch, capsys):
  assert tpu.main(["babysit", *BASE, "--repo=r", "--dry-run", "--", *MAIN]) == 0
  assert tpu.main(["create", *BASE, "--", *MAIN]) == 0 and tpu.main(["create", *BASE]) == 0
  assert preflights == [("v4-16", MAIN)] * 2, "create checks only when told what will run"
  monkeypatch.setattr(aot, "preflight", _refuse)
  calls = len(fake.calls())
  for verb in (["create"], ["run"], ["babysit", "--repo=r"]):
    with pytest.raises(SystemExit) as e:
      tpu.main([*verb[:1], *BASE, *verb[1:], "--", *MAIN])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "tinyjax: error: v4-16 cannot hold this run: the train step needs 99.0 GiB per chip")
  assert len(fake.calls()) == calls, "nothing may be created or launched"
  assert tpu.main(["run", *BASE, "--skip-preflight", "--", *MAIN]) == 0


@pytest.mark.slow  # a real libtpu compile (~8 s)
@pytest.mark.skipif(not targets.compiler_installed("tpu"), reason="pip install -e '.[tpu-compile]'")
def test_preflight_refuses_a_run_that_cannot_fit_by_libtpus_figures(fake, monkeypatch, capsys):
  """The real compile: tiny with an 8,388,608-token vocabulary on a v5e-8 (16 GiB chips): its embedding and head alone
  exceed a chip, and libtpu refuses to compile the step (its figure is a lower bound: "needs at least")."""
  monkeypatch.setattr(aot, "preflight", REAL_PREFLIGHT)
  main = ["--config=configs/tiny.py", "--config.model.vocab_size=8388608", "--workdir=gs://b/r"]
  with pytest.raises(SystemExit) as e:
    tpu.main(["babysit", "--name=tj", "--zone=z", "--accelerator-type=v5e-8", "--repo=r", "--dry-run", "--", *main])
  line = capsys.readouterr().err.strip().splitlines()[-1]
  assert e.value.code == 2
  assert line.startswith("tinyjax: error: v5e-8 cannot hold this run: the train step needs at least"), line
  assert "GiB per chip and 16.0 GiB are usable (libtpu" in line and "--skip-preflight" in line
  assert fake.calls() == []
