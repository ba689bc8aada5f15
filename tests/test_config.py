"""Catalogue of user mistakes and damaged workdirs: each is one line on stderr with its exit code, nothing harmed."""
import hashlib
import json
import os
import shutil
import subprocess
import time

import pytest

from tinyjax import cli, config
from tinyjax.runtime import workdir as workdirs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")
# The shrunk tiny run of the damaged-workdir fixture (4 steps, 1 layer, checkpoints at 2 and 4).
SMALL = ["--config.train.num_train_steps=4", "--config.model.num_layers=1", "--config.train.train_batch_size=8",
         "--config.checkpoint.save_interval_steps=2", "--config.train.log_every=1", "--config.train.steps_per_eval=4",
         "--config.train.max_eval_batches=1", "--config.train.sample_prompts=()"]

# (group.key, value, expected substring of the one line): config.validate's refusals (in-process: no jax start).
VALIDATE = [
    ("model.hidden_dim", 0, "config.model.hidden_dim=0 is invalid"),
    ("model.num_layers", -1, "config.model.num_layers=-1"),
    ("model.num_heads", 3, "must divide model.hidden_dim=128"),
    ("model.num_kv_heads", 3, "must divide model.num_heads"),
    ("model.seq_len", 1, "must be >= 2"),
    ("model.vocab_size", 0, "config.model.vocab_size"),
    ("model.layer_norm_epsilon", 0.0, "config.model.layer_norm_epsilon"),
    ("model.param_dtype", "float8", "config.model.param_dtype"),
    ("model.compute_dtype", "fp16", "config.model.compute_dtype"),
    ("model.remat", "sometimes", "config.model.remat"),
    ("model.attention", "magic", "config.model.attention"),
    ("model.attention_block", 0, "config.model.attention_block"),
    ("model.loss_block_size", -1, "config.model.loss_block_size"),
    ("model.loss_impl", "liger", "config.model.loss_impl='liger' is invalid: allowed: auto, fused, blockwise, pallas_tpu, pallas_gpu"),
    ("optimizer.name", "sgd", "config.optimizer.name='sgd' is invalid"),
    ("optimizer.lr_schedule", "step", "config.optimizer.lr_schedule"),
    ("optimizer.coefficient_type", "septic", "config.optimizer.coefficient_type"),
    ("optimizer.learning_rate", 0.0, "config.optimizer.learning_rate"),
    ("optimizer.adam_lr", -1.0, "config.optimizer.adam_lr"),
    ("optimizer.beta1", 1.0, "must be in [0, 1)"),
    ("optimizer.beta2", -0.1, "config.optimizer.beta2"),
    ("optimizer.momentum", 1.5, "config.optimizer.momentum"),
    ("optimizer.epsilon", -1e-8, "config.optimizer.epsilon"),
    ("optimizer.max_grad_norm", -1.0, "config.optimizer.max_grad_norm"),
    ("optimizer.weight_decay", -0.1, "config.optimizer.weight_decay"),
    ("optimizer.backend_steps", 0, "config.optimizer.backend_steps"),
    ("optimizer.warmup", 1.5, "a fraction <= 1 or a whole number of steps"),
    ("optimizer.warmup", 600.0, "config.optimizer.warmup=600.0 is invalid: must fit in the 500 training steps"),
    ("optimizer.decay", -0.5, "config.optimizer.decay"),
    ("train.train_batch_size", 0, "config.train.train_batch_size"),
    ("train.num_train_steps", -5, "config.train.num_train_steps"),
    ("train.grad_accum_steps", -1, "config.train.grad_accum_steps"),
    ("train.steps_per_eval", 0, "config.train.steps_per_eval"),
    ("train.log_every", 0, "config.train.log_every"),
    ("train.dynamics_rows", 0, "config.train.dynamics_rows"),
    ("train.z_loss_weight", -1.0, "config.train.z_loss_weight"),
    ("train.loss_spike_window", 0, "config.train.loss_spike_window=0 is invalid"),
    ("train.loss_spike_window", -3, "config.train.loss_spike_window"),
    ("train.loss_spike_ratio", -1.0, "config.train.loss_spike_ratio"),
    ("data.train_urls", (), "config.data.train_urls"),
    ("data.num_workers", -1, "config.data.num_workers"),
    ("data.max_bad_fraction", 2.0, "config.data.max_bad_fraction"),
    ("data.cache_dir", "gs://bucket/dir", "config.data.cache_dir='gs://bucket/dir' is invalid: must be a local "
     "directory (tokenizers, caches being built, the local mirror of a gs:// workdir); to train from token caches on "
     "GCS, build them once (python -m tinyjax.data), copy each cache folder to the bucket and name it in "
     "data.train_urls / data.validation_urls (read in place)"),
    ("mesh.data", 0, "config.mesh.data"),
    ("mesh.data", 3, "must divide the 8 available devices"),
    ("train.train_batch_size", 12, "must be divisible by the data-parallel size 8"),
    ("train.grad_accum_steps", 3, "config.train.grad_accum_steps=3 is invalid: must divide the per-device batch"),
    ("checkpoint.max_to_keep", 0, "0 would delete every checkpoint"),
    ("checkpoint.save_interval_steps", -1, "config.checkpoint.save_interval_steps=-1"),
    ("checkpoint.save_interval_minutes", -10.0, "config.checkpoint.save_interval_minutes"),
    ("checkpoint.keep_period", -2, "config.checkpoint.keep_period"),
    ("distributed.mode", "maybe", "config.distributed.mode"),
    ("distributed.num_processes", -1, "config.distributed.num_processes"),
    ("distributed.process_id", -2, "config.distributed.process_id"),
    ("env.host_device_count", -1, "config.env.host_device_count"),
]


@pytest.mark.parametrize("key,value,expected", VALIDATE, ids=[f"{k}={v!r}" for k, v, _ in VALIDATE])
def test_validate_refuses_with_one_line_exit_2(key, value, expected, capsys):
  import importlib.util  # noqa: PLC0415
  spec = importlib.util.spec_from_file_location("_catalogue_tiny", TINY)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = module.get_config()
  group, name = key.split(".")
  cfg[group][name] = value
  with pytest.raises(SystemExit) as exit_:
    try:
      config.validate(cfg, num_devices=8)
    except config.ConfigError as e:  # what main does with it
      cli.fail(str(e))
  err = capsys.readouterr().err
  assert exit_.value.code == 2 and err.count("\n") == 1 and err.startswith("tinyjax: error: ") and expected in err


def _write(tmp, name, text):
  path = tmp / name
  path.write_text(text)
  return str(path)


@pytest.fixture(scope="module")
def main(run_program, child_env):
  """main(args, launcher=("-m", "tinyjax.main") or ("-c", CODE), cwd=, timeout=, **env): a tinyjax program in a user's
  environment (child_env: one CPU device) with `env` changes."""
  def run(args, cwd=ROOT, timeout=300, launcher=("-m", "tinyjax.main"), **env):
    how = {"module": launcher[1]} if launcher[0] == "-m" else {"code": launcher[1]}
    return run_program(*args, cwd=cwd, env=child_env(**env), timeout=timeout, **how)
  return run


@pytest.fixture(scope="module")
def error_line(one_line):
  """one_line's one-line stop, which must also be a `tinyjax: error: ` line."""
  def check(proc, code, expected):
    line = one_line(proc, code, expected)
    assert line.startswith("tinyjax: error: "), proc.stderr[-2000:]
    return line
  return check


# Mistakes caught by the flag parser or before any training (one short subprocess each).
PARSER = [
    ([], "--config=configs/NAME.py is required"),
    (["--config=configs/nope.py"], "no such config file"),
    (["--config={syntax}"], "SyntaxError"),
    (["--config={noget}"], "defines no get_config()"),
    (["--config={raising}"], "get_config() raised RuntimeError: boom"),
    (["--config={tiny}", "--config.train.no_such_key=1"], "unknown config key config.train.no_such_key"),
    (["--config={tiny}", "--config.model.hidden_dim=abc"], "hidden_dim"),
    (["--config={tiny}", "stray"], "unexpected argument 'stray'"),
    (["--config={tiny}", "--config.env.platform=tpu"], "config.env.platform='tpu'"),
    # With libtpu and the CUDA plugin installed ([test] extras), loading them printed 3 lines before this one.
    (["--config={tiny}", "--config.env.platform=potato"], "config.env.platform='potato' is invalid: allowed: cpu"),
    pytest.param(["--config={tiny}", "--config.env.xla_flags=('--xla_bogus_flag=1',)"], "unknown XLA flag --xla_bogus_flag=1",
                 marks=pytest.mark.slow),  # starts JAX (~3 s)
    pytest.param(["--config={tiny}", "--config.optimizer.warmup=600"], "config.optimizer.warmup=600",
                 marks=pytest.mark.slow),  # also in VALIDATE, in-process
]


@pytest.mark.parametrize("args,expected", PARSER, ids=[getattr(p, "values", p)[1][:40] for p in PARSER])
def test_parser_and_startup_mistakes(args, expected, tmp_path, main, error_line):
  files = {"syntax": _write(tmp_path, "syntax.py", "def get_config(:\n"), "noget": _write(tmp_path, "noget.py", "X=1\n"),
           "raising": _write(tmp_path, "raising.py", "def get_config():\n  raise RuntimeError('boom')\n"),
           "tiny": TINY}
  args = [a.format(**files) for a in args] + [f"--workdir={tmp_path / 'w'}"]
  error_line(main(args), 2, expected)
  assert not (tmp_path / "w" / "checkpoints").exists()  # nothing was started


@pytest.mark.parametrize("launcher", [("-m", "tinyjax.main"), ("-m", "tinyjax.data")])
def test_gcs_cache_dir_is_refused_before_anything_is_created(launcher, tmp_path, main, error_line):
  """data.cache_dir=gs://... once made a local folder named gs: and ended in a traceback."""
  args = [f"--config={TINY}", "--config.data.cache_dir=gs://bucket/dir"]
  args += ["--workdir=gs://bucket/run"] if launcher[1] == "tinyjax.main" else []
  error_line(main(args, cwd=tmp_path, launcher=launcher), 2, "config.data.cache_dir='gs://bucket/dir' is invalid")
  assert os.listdir(tmp_path) == []


@pytest.fixture(scope="module")
def trained(tmp_path_factory, main):
  """One small finished run (checkpoints 2 and 4) that the damage cases copy."""
  workdir = tmp_path_factory.mktemp("catalogue") / "w"
  proc = main([f"--config={TINY}", *SMALL, f"--workdir={workdir}"])
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir


def _digest(workdir):
  """Content hash of every file under the workdir except the lock and tensorboard (what a refusal must not touch)."""
  out = {}
  for root, _, names in os.walk(workdir):
    for name in names:
      path = os.path.join(root, name)
      if ".tinyjax.lock" in name or "tensorboard" in path or not os.path.isfile(path):
        continue
      with open(path, "rb") as f:
        out[os.path.relpath(path, workdir)] = hashlib.sha256(f.read()).hexdigest()
  return out


_HELD = []


def _hold_lock(w):
  lock = workdirs.Lock(str(w), str(w))  # a live trainer on this host: this test process holds the lock
  lock.acquire()
  _HELD.append(lock)


def _checkpoints_file(w):
  shutil.rmtree(w / "checkpoints")
  (w / "checkpoints").write_text("not a folder")


def _garbled_metrics(w):
  with open(w / "metrics.jsonl", "ab") as f:
    f.write(b"\xff\xfe{}\n")


# (damage, extra args, exit code, expected substring): each on a fresh copy of the fixture.
DAMAGE = [
    (_hold_lock, [], 2, "is in use by another tinyjax run"),
    (_checkpoints_file, [], 2, "is not a directory"),
    (None, ["--config.data.cache_dir={tmp}/file"], 2, "config.data.cache_dir="),
    (None, ["--config.data.cache_dir=/proc/tinyjax"], 2, "is not a writable directory"),
    (None, ["--config.checkpoint.max_to_keep=0"], 2, "0 would delete every checkpoint"),
    (None, ["--config.train.loss_spike_window=0"], 2, "config.train.loss_spike_window"),
]
SLOW_DAMAGE = [  # these restore a checkpoint first (~10 s each on 2 cores)
    (_garbled_metrics, [], 2, "is not UTF-8 (invalid start byte)"),
    (None, ["--config.optimizer.learning_rate=0.01"], 2, "optimizer.learning_rate"),
    (None, ["--config.train.train_batch_size=16"], 2, "train.train_batch_size"),
    (None, ["--config.optimizer.name=adamw"], 2, "checkpoint"),
]


def _damage_case(main, error_line, trained, tmp_path, damage, extra, code, expected):
  w = tmp_path / "w"
  shutil.copytree(trained, w)
  (tmp_path / "file").write_text("x")
  if damage:
    damage(w)
  before = _digest(w)
  proc = main([f"--config={TINY}", *SMALL, *[a.format(tmp=tmp_path) for a in extra], f"--workdir={w}"])
  while _HELD:
    _HELD.pop().release()
  error_line(proc, code, expected)
  assert _digest(w) == before  # checkpoints, metrics, config and records untouched


@pytest.mark.slow
@pytest.mark.parametrize("damage,extra,code,expected", DAMAGE, ids=[d[3][:40] for d in DAMAGE])
def test_damaged_workdir_is_refused_and_left_intact(main, error_line, trained, tmp_path, damage, extra, code,
                                                    expected):
  _damage_case(main, error_line, trained, tmp_path, damage, extra, code, expected)


@pytest.mark.slow
@pytest.mark.parametrize("damage,extra,code,expected", SLOW_DAMAGE, ids=[d[3][:40] for d in SLOW_DAMAGE])
def test_damaged_workdir_after_restore(main, error_line, trained, tmp_path, damage, extra, code, expected):
  _damage_case(main, error_line, trained, tmp_path, damage, extra, code, expected)


# A full disk (item 11): a small tmpfs holds the workdir (conftest's small_disk: needs root, skipped otherwise).


def _stable_rows(workdir):
  """metrics.jsonl without the fields that measure time."""
  return [{k: v for k, v in row.items() if not any(t in k for t in ("time", "per_second", "eta"))}
          for row in (json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines())]


# As if the disk filled up while the save ran: the space check before the save sees room (Orbax's write then fails).
_NO_SPACE_CHECK = ("import runpy, sys; from tinyjax.runtime import checkpoint; "
                   "checkpoint.DiskSpace.free = lambda self: None; "
                   "sys.argv = ['tinyjax.main'] + sys.argv[1:]; runpy.run_module('tinyjax.main', run_name='__main__')")


@pytest.mark.slow
@pytest.mark.parametrize("during_save", [False, True], ids=["seen-before-the-save", "write-fails-during-the-save"])
def test_disk_full_is_one_line_and_the_run_resumes_exactly(main, error_line, trained, small_disk, during_save):
  # 15 MB: room for checkpoint 2 (~10 MB on disk) but not also checkpoint 4.
  w = small_disk("15m") / "w"
  args = [f"--config={TINY}", *SMALL, f"--workdir={w}"]
  if during_save:
    proc = main(args, launcher=("-c", _NO_SPACE_CHECK))
    error_line(proc, 2, "disk full: checkpoint step 4 could not be written to")
    assert "(No space left on device)" in proc.stderr
  else:
    proc = main(args)
    error_line(proc, 2, "disk full: checkpoint step 4 needs about")
  assert "the last complete checkpoint, step 2, is intact" in proc.stderr
  assert sorted(os.listdir(w / "checkpoints")) == ["2"]  # no half-written step 4 left behind
  assert json.loads((w / "run_info.json").read_text())["status"] == "disk_full"
  small_disk("40m")  # space freed: the same command resumes from step 2 and ends as the uninterrupted run did
  assert main(args).returncode == 0
  assert _stable_rows(w) == _stable_rows(trained)


# The disk fills up completely the moment the save of step 4 starts (the run waits for the test to fill it): the
# save, TensorBoard, metrics.jsonl and run_info.json writes all fail.
_FILL_DURING_SAVE = ("import os, runpy, sys, time; from tinyjax.runtime import checkpoint; "
                     "checkpoint.DiskSpace.free = lambda self: None; real = checkpoint.Checkpointer.save\n"
                     "def save(self, step, state, meta):\n"
                     "  if step == 4:\n"
                     "    open(os.environ['FILL_NOW'], 'w').close()\n"
                     "    while not os.path.exists(os.environ['FILLED']): time.sleep(0.01)\n"
                     "  return real(self, step, state, meta)\n"
                     "checkpoint.Checkpointer.save = save; sys.argv = ['tinyjax.main'] + sys.argv[1:]; "
                     "runpy.run_module('tinyjax.main', run_name='__main__')")


@pytest.mark.slow
def test_disk_filling_up_during_a_save_is_one_line_and_the_run_resumes_exactly(main, error_line, trained, small_disk,
                                                                              run_program, child_env, tmp_path):
  """Before: the TensorBoard writer thread died with ENOSPC, the loop blocked for minutes on its queue, a first
  SIGTERM did nothing, and `<step>.orbax-checkpoint-tmp` stayed behind."""
  w = small_disk("40m") / "w"
  args = [f"--config={TINY}", *SMALL, f"--workdir={w}"]
  fill_now, filled = tmp_path / "fill-now", tmp_path / "filled"
  proc = run_program(*args, code=_FILL_DURING_SAVE, popen=True,
                     env=child_env(FILL_NOW=str(fill_now), FILLED=str(filled)))
  while not fill_now.exists() and proc.poll() is None:
    time.sleep(0.01)
  with open(w.parent / "filler", "wb") as f:  # every byte left
    try:
      while True:
        f.write(b"\0" * (1 << 20))
        f.flush()
    except OSError:
      pass
  filled.touch()
  out, err = proc.communicate(timeout=300)
  proc.stdout = proc.stderr = None
  error_line(subprocess.CompletedProcess(proc.args, proc.returncode, out, err), 2,
            "disk full: checkpoint step 4 could not be written to")
  assert "the last complete checkpoint, step 2, is intact" in err
  assert sorted(os.listdir(w / "checkpoints")) == ["2"]  # no half-written step 4 left behind
  os.remove(w.parent / "filler")  # space freed: the same command resumes from step 2 and ends as uninterrupted
  assert main(args).returncode == 0
  assert _stable_rows(w) == _stable_rows(trained)


@pytest.mark.slow
def test_no_room_for_one_checkpoint_is_refused_before_training(main, error_line, small_disk):
  w = small_disk("6m") / "w"  # a checkpoint of this state needs ~14 MB
  error_line(main([f"--config={TINY}", *SMALL, f"--workdir={w}"]), 2, "free but a checkpoint of this run needs about")
  assert not (w / "metrics.jsonl").exists() and os.listdir(w / "checkpoints") == []


@pytest.mark.slow
def test_full_disk_while_writing_metrics_is_one_line(main, error_line, small_disk):
  w = small_disk("20k") / "w"  # checkpoints off: the small files themselves fill it
  proc = main([f"--config={TINY}", *SMALL, "--config.checkpoint.enabled=False", f"--workdir={w}"])
  error_line(proc, 2, "disk full (No space left on device) writing")
  assert not [n for n in os.listdir(w) if n.endswith(".tmp")]  # no partial run_info.json.tmp


@pytest.mark.slow
def test_offline_hub_tokenizer_is_one_line_without_retry_warnings(main, error_line, tmp_path):
  """No network (a closed local port as the hub): huggingface_hub retries ~25 s, and its warnings stay quiet."""
  proc = main([f"--config={TINY}", *SMALL, "--config.data.tokenizer=marin-community/marin-tokenizer",
                f"--config.data.cache_dir={tmp_path / 'cache'}", f"--workdir={tmp_path / 'w'}"],
               HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"))
  error_line(proc, 2, "config.data.tokenizer='marin-community/marin-tokenizer': not 'builtin', not an existing path, "
                     "and downloading it from the HF hub failed")
  assert not os.listdir(tmp_path / "cache" / "tokenizers" / "hub" / "marin-community--marin-tokenizer")  # no debris
