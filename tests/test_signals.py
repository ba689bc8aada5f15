"""Stop signals at every moment of a run (issue 19): during setup (data build, restore, compile, a gc callback) a
SIGTERM/SIGINT/SIGHUP stops the run with StoppedInSetup at the next safe point, never misread as a damaged checkpoint
and never swallowed; in the loop it checkpoints at the next step boundary; data-build workers end with their parent."""
import gc
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap

import orbax.checkpoint as ocp
import psutil
import pytest
from small_runs import run, small_cfg

from tinyjax import data, train
from tinyjax.data import builder, cache
from tinyjax.runtime import faults, metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ("alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega signal checkpoint restore compile "
         "token window batch step loss").split()


def _corpus(directory, files=3, docs=150, seed=0):
  """files x docs small JSONL documents of random words (a fast tokenizer and cache build)."""
  rng = random.Random(seed)
  os.makedirs(directory, exist_ok=True)
  paths = []
  for i in range(files):
    path = os.path.join(directory, f"part{i}.jsonl")
    with open(path, "w") as f:
      for _ in range(docs):
        f.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 80)))}) + "\n")
    paths.append(path)
  return paths


def _cfg(root, **overrides):
  files = _corpus(os.path.join(root, "text"))
  return small_cfg(os.path.join(root, "cache"), **{"data.train_urls": files[:-1],
                                                  "data.validation_urls": {"held_out": files[-1:]}, **overrides})


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """(root, workdir): a finished 8-step run with checkpoints 4 and 8."""
  root = str(tmp_path_factory.mktemp("signals"))
  run(_cfg(root), os.path.join(root, "finished"))
  return root, os.path.join(root, "finished")


def _signal_inside(monkeypatch, owner, name, sig=signal.SIGTERM):
  """Makes owner.name send `sig` to this process on its first call, then do its work: the signal lands inside it."""
  real, sent = getattr(owner, name), []

  def wrapper(*args, **kwargs):
    if not sent:
      sent.append(sig)
      os.kill(os.getpid(), sig)
    return real(*args, **kwargs)
  monkeypatch.setattr(owner, name, wrapper)
  return sent


def test_signal_inside_a_restore_stops_the_run_and_keeps_every_checkpoint(finished, tmp_path, monkeypatch):
  """Before: the restore's `except Exception` caught the handler's exception, called the good newest checkpoint
  unreadable, moved it aside and resumed from the previous one (exit 0)."""
  root, done = finished
  shutil.copytree(done, tmp_path / "w")
  sent = _signal_inside(monkeypatch, ocp.CheckpointManager, "restore")
  with pytest.raises(faults.StoppedInSetup, match="^stopped by SIGTERM during setup, before any step"):
    run(_cfg(root, **{"train.memory_check": False}), tmp_path / "w")  # no ahead-of-time compile: faster
  assert sent and sorted(os.listdir(tmp_path / "w" / "checkpoints")) == ["4", "8"]  # nothing moved aside
  assert metrics.read(str(tmp_path / "w")) == metrics.read(done)


def test_signal_inside_a_gc_callback_is_not_swallowed(finished, tmp_path, monkeypatch):
  """Before: raised inside JAX's gc callback, the handler's exception was printed as "Exception ignored" and the
  run went on to the end. A signal handled while the garbage collector runs its callbacks now stops the run too."""
  root, _ = finished
  fired = []

  def callback(phase, info):
    if not fired:
      fired.append(phase)
      os.kill(os.getpid(), signal.SIGINT)
  real = data.prepare

  def prepare(cfg):
    gc.callbacks.insert(0, callback)
    try:
      gc.collect()
    finally:
      gc.callbacks.remove(callback)
    return real(cfg)
  monkeypatch.setattr(data, "prepare", prepare)
  with pytest.raises(faults.StoppedInSetup, match="^stopped by SIGINT during setup"):
    run(_cfg(root), tmp_path / "w")
  assert fired and not (tmp_path / "w" / "metrics.jsonl").exists()


def test_signal_during_compile_stops_before_any_step(finished, tmp_path, monkeypatch):
  root, _ = finished
  _signal_inside(monkeypatch, train, "compile_step", signal.SIGHUP)
  with pytest.raises(faults.StoppedInSetup, match="^stopped by SIGHUP during setup"):
    run(_cfg(root), tmp_path / "w")
  assert not (tmp_path / "w" / "checkpoints").exists() and not (tmp_path / "w" / "metrics.jsonl").exists()


def test_signal_during_the_data_build_stops_it_and_the_rerun_resumes_it(tmp_path, monkeypatch):
  cfg = _cfg(str(tmp_path), **{"data.num_proc": 1})  # in this process (the worker pool: the data-CLI test below)
  sent = _signal_inside(monkeypatch, builder, "_encode_shard")
  with pytest.raises(faults.StoppedInSetup, match="^stopped by SIGTERM during setup"):
    run(cfg, tmp_path / "w")
  caches = [d for _, dirs, _ in os.walk(tmp_path / "cache") for d in dirs]
  assert sent and "train.building" in caches and "train" not in caches  # unfinished, never read as a cache
  monkeypatch.undo()
  assert cache.TokenCache(data.prepare(cfg).train_cache).num_tokens > 0  # the same config builds the rest


def test_sighup_in_the_first_step_checkpoints_it(finished, tmp_path):
  """A SIGHUP (closed terminal or ssh session) is a SIGTERM: before, it killed the run silently, with no checkpoint
  and run_info.json left "running". (The resume to identical rows: test_trust_faults.py.)"""
  root, _ = finished
  with pytest.raises(faults.Preempted, match="^stopped by SIGHUP at step 1; checkpoint written"):
    run(_cfg(root), tmp_path / "w", sigterm_at=1, sig=signal.SIGHUP)
  assert sorted(os.listdir(tmp_path / "w" / "checkpoints")) == ["1"]
  assert json.loads((tmp_path / "w" / "run_info.json").read_text())["status"] == "preempted"


def test_newest_checkpoint_holding_only_state_is_never_resumed_from(finished, tmp_path, capsys):
  """The shape a kill can leave where a save's finishing rename is not atomic (a gcsfuse-mounted workdir copies
  then deletes each object; on gs:// Orbax writes into <step>/ and marks it complete last): <step>/ with only
  state/. It is skipped and kept aside, and the run resumes from the previous checkpoint to the same end."""
  root, done = finished
  w = tmp_path / "w"
  shutil.copytree(done, w)
  for name in os.listdir(w / "checkpoints" / "8"):
    if name != "state":
      target = w / "checkpoints" / "8" / name
      shutil.rmtree(target) if target.is_dir() else target.unlink()
  run(_cfg(root), w)
  assert "resuming from checkpoint at step 4/8" in capsys.readouterr().out
  assert any(n.startswith("8.corrupt-") for n in os.listdir(w / "checkpoints"))
  sha = lambda d: [r["param_sha256"] for r in metrics.read(str(d)) if "param_sha256" in r]
  assert sha(w) == sha(done) and len(sha(done)) == 1


# The handler alone, in a process that imports nothing but tinyjax.runtime.faults (no jax): ~0.3 s each.
_HOLD = textwrap.dedent("""
    import sys, time
    from tinyjax.runtime import faults
    with faults.handling_signals(grace_s=float(sys.argv[1])):
      print("ready", flush=True)
      time.sleep(120)  # a setup step without a safe point (an XLA compile, an Orbax restore)
    """)


def _hold(grace):
  proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(grace)], cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  assert proc.stdout.readline() == "ready\n"
  return proc


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_setup_without_a_safe_point_still_stops_within_the_grace(sig):
  proc = _hold(0.5)
  proc.send_signal(sig)
  out, err = proc.communicate(timeout=60)
  assert proc.returncode == faults.EXIT_PREEMPTED
  assert err.splitlines() == [f"tinyjax: stopped by {sig.name} during setup, before any step; rerun the same "
                              "command to continue"]


def test_a_second_signal_exits_at_once():
  proc = _hold(60)
  proc.send_signal(signal.SIGTERM)
  proc.send_signal(signal.SIGHUP)
  proc.communicate(timeout=60)
  assert proc.returncode == 128 + signal.SIGHUP


# python -m tinyjax.data: stop signals while its worker pool starts.
def _data_cli(tmp_path):
  files = _corpus(tmp_path / "text", files=4, docs=400)
  cfg_file = tmp_path / "cfg.py"
  cfg_file.write_text(textwrap.dedent(f"""
      from tinyjax import config
      def get_config():
        c = config.base()
        c.data.cache_dir, c.data.train_urls, c.data.validation_urls = {str(tmp_path / "cache")!r}, {files!r}, {{}}
        c.model.vocab_size, c.model.seq_len, c.data.num_proc = 512, 32, 2
        return c
      """))
  env = {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, "JAX_PLATFORMS": "cpu"}
  return [sys.executable, "-m", "tinyjax.data", f"--config={cfg_file}"], env


def _workers_when_started(proc, workers=1, threads=1):
  """The build's pool workers (spawned: `spawn_main` in their command line), as soon as `workers` of them run with
  `threads` threads (2: past the tinyjax import in their startup, whose parent watch is their first extra thread)."""
  me = psutil.Process(proc.pid)
  while proc.poll() is None:
    found = []
    for child in me.children():
      try:
        if "spawn_main" in " ".join(child.cmdline()) and child.num_threads() >= threads:
          found.append(child)
      except psutil.NoSuchProcess:
        pass
    if len(found) >= workers:
      return found
  raise AssertionError(f"the build ended (exit {proc.returncode}) before its workers started")


@pytest.mark.slow  # two data-CLI runs with a 2-worker pool (~20 s on 2 cores)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_data_cli_signal_while_its_workers_start(tmp_path, sig):
  """Before: SIGTERM exited 143 with no line; the workers lived on > 5 s, then died with UnpicklingError tracebacks
  and leaked-semaphore warnings."""
  cmd, env = _data_cli(tmp_path)
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  # SIGKILL once both workers have begun their startup: a kill before a worker reads its first bytes from the parent
  # (a ~1 ms window) still shows Python's EOFError traceback from multiprocessing's own spawn code.
  workers = _workers_when_started(proc, *((1, 1) if sig == signal.SIGTERM else (2, 2)))
  proc.send_signal(sig)
  out, err = proc.communicate(timeout=120)  # returns once every holder of its stderr (the workers) has gone
  _, alive = psutil.wait_procs(workers, timeout=10)  # at once: they watch the parent (before: > 5 s, then tracebacks)
  assert not alive
  if sig == signal.SIGTERM:
    assert proc.returncode == faults.EXIT_PREEMPTED
    assert err.splitlines() == ["tinyjax: stopped by SIGTERM while building the data caches; rerun to resume the "
                                "build"]
  else:
    assert proc.returncode == -signal.SIGKILL and "Traceback" not in err and "Error" not in err, err[-2000:]
  rerun = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert rerun.returncode == 0 and "train: 1,600 docs" in rerun.stdout, rerun.stderr[-2000:]


# Grain's prefetch workers (data.num_workers > 0) of a process that reads training batches, then is killed with -9.
_READ_BATCHES = textwrap.dedent("""
    import importlib.util, sys
    from tinyjax import data
    from tinyjax.runtime import faults
    faults.quiet_background_noise()  # as the trainer does
    spec = importlib.util.spec_from_file_location("cfg", sys.argv[1])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config()
    cfg.data.num_workers = 2
    batches = data.train_batches(data.prepare(cfg), cfg)
    next(batches)
    print("reading", flush=True)
    for _ in batches:
      pass
    """)


@pytest.mark.slow  # a data build and two Grain worker processes (~15 s on 2 cores)
def test_grain_workers_end_with_their_killed_parent(tmp_path):
  """Before: after a kill -9 of the trainer its Grain workers lived on (still there 20 s later, measured), and the
  resource tracker warned of 50 leaked semaphores and 10 shared-memory blocks."""
  cmd, env = _data_cli(tmp_path)
  proc = subprocess.Popen([sys.executable, "-c", _READ_BATCHES, cmd[-1].split("=", 1)[1]], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  assert "reading\n" in iter(proc.stdout.readline, ""), "the script ended before reading batches"
  workers = [c for c in psutil.Process(proc.pid).children() if "spawn_main" in " ".join(c.cmdline())]
  proc.kill()
  _, err = proc.communicate(timeout=120)
  _, alive = psutil.wait_procs(workers, timeout=10)
  assert len(workers) == 2 and not alive and err == "", err[-2000:]
