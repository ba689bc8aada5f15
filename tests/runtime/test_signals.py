"""Stop signals at every moment of a run (tinyjax/runtime/faults.py's Signals; issue 19): during setup (data build,
restore, compile, a gc callback) a SIGTERM/SIGINT/SIGHUP stops the run with StoppedInSetup at the next safe point,
never misread as a damaged checkpoint and never swallowed, and a program exits 75 with one line; in the loop it
checkpoints at the next step boundary; data-build workers end with their parent."""
import gc
import json
import os
import shutil
import signal
import textwrap

import orbax.checkpoint as ocp
import psutil
import pytest

from tinyjax import data, errors, step
from tinyjax.data import builder, cache
from tinyjax.runtime import faults


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


@pytest.mark.slow  # the small config's reference run and a restore (~10 s on 2 cores)
def test_signal_inside_a_restore_stops_the_run_and_keeps_every_checkpoint(reference_run, small_cfg, train_run, rows,
                                                                           tmp_path, monkeypatch):
  """Before: the restore's `except Exception` caught the handler's exception, called the good newest checkpoint
  unreadable, moved it aside and resumed from the previous one (exit 0)."""
  shutil.copytree(reference_run, tmp_path / "w")
  sent = _signal_inside(monkeypatch, ocp.CheckpointManager, "restore")
  with pytest.raises(errors.StoppedInSetup, match="^stopped by SIGTERM during setup, before any step"):
    train_run(small_cfg(**{"train.memory_check": False}), tmp_path / "w")  # no ahead-of-time compile: faster
  assert sent and sorted(os.listdir(tmp_path / "w" / "checkpoints")) == ["4", "8"]  # nothing moved aside
  assert rows(tmp_path / "w") == rows(reference_run)


def test_signal_inside_a_gc_callback_is_not_swallowed(small_cfg, train_run, tmp_path, monkeypatch):
  """Before: raised inside JAX's gc callback, the handler's exception was printed as "Exception ignored" and the
  run went on to the end. A signal handled while the garbage collector runs its callbacks now stops the run too."""
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
  with pytest.raises(errors.StoppedInSetup, match="^stopped by SIGINT during setup"):
    train_run(small_cfg(), tmp_path / "w")
  assert fired and not (tmp_path / "w" / "metrics.jsonl").exists()


@pytest.mark.slow  # the small step's compile (~5 s on 2 cores)
def test_signal_during_compile_stops_before_any_step(small_cfg, train_run, tmp_path, monkeypatch):
  _signal_inside(monkeypatch, step, "compile_for_device", signal.SIGHUP)
  with pytest.raises(errors.StoppedInSetup, match="^stopped by SIGHUP during setup"):
    train_run(small_cfg(), tmp_path / "w")
  assert not (tmp_path / "w" / "checkpoints").exists() and not (tmp_path / "w" / "metrics.jsonl").exists()


def test_signal_during_the_data_build_stops_it_and_the_rerun_resumes_it(small_cfg, train_run, write_corpus, tmp_path,
                                                                         monkeypatch):
  files = write_corpus(tmp_path / "text")  # a fresh cache_dir: the build runs here
  cfg = small_cfg(**{"data.cache_dir": str(tmp_path / "cache"), "data.train_urls": files[:-1],
                     "data.validation_urls": {"held_out": files[-1:]},
                     "data.num_proc": 1})  # in this process (the worker pool: the data-CLI test below)
  sent = _signal_inside(monkeypatch, builder, "_encode_shard")
  with pytest.raises(errors.StoppedInSetup, match="^stopped by SIGTERM during setup"):
    train_run(cfg, tmp_path / "w")
  caches = [d for _, dirs, _ in os.walk(tmp_path / "cache") for d in dirs]
  assert sent and "train.building" in caches and "train" not in caches  # unfinished, never read as a cache
  monkeypatch.undo()
  assert cache.TokenCache(data.prepare(cfg).train_cache).num_tokens > 0  # the same config builds the rest


@pytest.mark.slow  # a compile and a step (~8 s on 2 cores)
def test_sighup_in_the_first_step_checkpoints_it(small_cfg, train_run, tmp_path):
  """A SIGHUP (closed terminal or ssh session) is a SIGTERM: before, it killed the run silently, with no checkpoint
  and run_info.json left "running". (The resume to identical rows: test_faults.py.)"""
  with pytest.raises(errors.Preempted, match="^stopped by SIGHUP at step 1; checkpoint written"):
    train_run(small_cfg(), tmp_path / "w", stop_at=1, sig=signal.SIGHUP)
  assert sorted(os.listdir(tmp_path / "w" / "checkpoints")) == ["1"]
  assert json.loads((tmp_path / "w" / "run_info.json").read_text())["status"] == "preempted"


# The handler alone, in a process that imports nothing but tinyjax.runtime.faults (no jax): ~0.3 s each.
_HOLD = textwrap.dedent("""
    import sys, time
    from tinyjax.runtime import faults
    with faults.handling_signals(grace_s=float(sys.argv[1])):
      print("ready", flush=True)
      time.sleep(120)  # a setup step without a safe point (an XLA compile, an Orbax restore)
    """)


@pytest.fixture
def hold(run_program):
  """hold(grace): the handler alone in a process, ready and in a setup step without a safe point."""
  def start(grace):
    proc = run_program(grace, code=_HOLD, popen=True)
    assert proc.stdout.readline() == "ready\n"
    return proc
  return start


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_setup_without_a_safe_point_still_stops_within_the_grace(hold, sig):
  proc = hold(0.5)
  proc.send_signal(sig)
  out, err = proc.communicate(timeout=60)
  assert proc.returncode == errors.EXIT_PREEMPTED
  assert err.splitlines() == [f"tinyjax: stopped by {sig.name} during setup, before any step; rerun the same "
                              "command to continue"]


def test_a_second_signal_exits_at_once(hold):
  proc = hold(60)
  proc.send_signal(signal.SIGTERM)
  proc.send_signal(signal.SIGHUP)
  proc.communicate(timeout=60)
  assert proc.returncode == 128 + signal.SIGHUP


@pytest.mark.slow  # a trainer program, stopped in its setup (~6 s each on 2 cores)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_stop_signal_during_setup_exits_75_with_one_line(run_program, small_args, tmp_path, sig):
  """A signal during a program's setup exits 75 with one line (audit item 13)."""
  proc = run_program(*small_args, "--config.train.num_train_steps=4", "--config.model.num_layers=1",
                     f"--workdir={tmp_path / 'w'}", popen=True)
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


# python -m tinyjax.data: stop signals while its worker pool starts.
@pytest.fixture
def data_cli(tmp_path, write_corpus, child_env):
  """(args of `python -m tinyjax.data`, its environment): a 2-worker build of 4 x 400 documents in tmp_path."""
  files = write_corpus(tmp_path / "text", files=4, docs=400)
  cfg_file = tmp_path / "cfg.py"
  cfg_file.write_text(textwrap.dedent(f"""
      from tinyjax import config
      def get_config():
        c = config.base()
        c.data.cache_dir, c.data.train_urls, c.data.validation_urls = {str(tmp_path / "cache")!r}, {files!r}, {{}}
        c.model.vocab_size, c.model.seq_len, c.data.num_proc = 512, 32, 2
        return c
      """))
  return [f"--config={cfg_file}"], child_env(XLA_FLAGS=None)


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
def test_data_cli_signal_while_its_workers_start(data_cli, run_program, sig):
  """Before: SIGTERM exited 143 with no line; the workers lived on > 5 s, then died with UnpicklingError tracebacks
  and leaked-semaphore warnings."""
  args, env = data_cli
  proc = run_program(*args, module="tinyjax.data", env=env, popen=True)
  # SIGKILL once both workers have begun their startup: a kill before a worker reads its first bytes from the parent
  # (a ~1 ms window) still shows Python's EOFError traceback from multiprocessing's own spawn code.
  workers = _workers_when_started(proc, *((1, 1) if sig == signal.SIGTERM else (2, 2)))
  proc.send_signal(sig)
  out, err = proc.communicate(timeout=120)  # returns once every holder of its stderr (the workers) has gone
  _, alive = psutil.wait_procs(workers, timeout=10)  # at once: they watch the parent (before: > 5 s, then tracebacks)
  assert not alive
  if sig == signal.SIGTERM:
    assert proc.returncode == errors.EXIT_PREEMPTED
    assert err.splitlines() == ["tinyjax: stopped by SIGTERM while building the data caches; rerun to resume the "
                                "build"]
  else:
    assert proc.returncode == -signal.SIGKILL and "Traceback" not in err and "Error" not in err, err[-2000:]
  rerun = run_program(*args, module="tinyjax.data", env=env, timeout=300)
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
def test_grain_workers_end_with_their_killed_parent(data_cli, run_program):
  """Before: after a kill -9 of the trainer its Grain workers lived on (still there 20 s later, measured), and the
  resource tracker warned of 50 leaked semaphores and 10 shared-memory blocks."""
  args, env = data_cli
  proc = run_program(args[-1].split("=", 1)[1], code=_READ_BATCHES, env=env, popen=True)
  assert "reading\n" in iter(proc.stdout.readline, ""), "the script ended before reading batches"
  workers = [c for c in psutil.Process(proc.pid).children() if "spawn_main" in " ".join(c.cmdline())]
  proc.kill()
  _, err = proc.communicate(timeout=120)
  _, alive = psutil.wait_procs(workers, timeout=10)
  assert len(workers) == 2 and not alive and err == "", err[-2000:]
