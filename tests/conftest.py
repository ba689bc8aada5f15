"""Test setup and the fixtures every test folder shares.

Before JAX starts: 8 fake CPU devices (sharding tests), fast XLA compiles (flax lm1b's jax_disable_most_optimizations),
and one persistent XLA compilation cache for the session, shared with the programs the tests start: a train step
compiled once is loaded by every later run of the same shapes (a small in-process run: 7.0 s -> 3.2 s on the 2-core
machine). The programs the tests start get one CPU device and XLA's default flags (support.child_env).

Fixtures (their helpers live in support.py, which only this file imports):
  token_cache    the session's data.cache_dir (builtin corpus, tokenizer and caches built once)
  small_cfg      small_cfg(**{"group.key": value}) -> tests/small_config.py on the session's token cache
  small_args     the same config on the command line: [--config=tests/small_config.py, --config.data.cache_dir=...]
  train_run      train_run(cfg, workdir, stop_at=, sig=, nan_at=): train.run in-process, optionally stopped or fed NaN
  reference_run  the small config's uninterrupted 8-step run (read-only: copy it to change it)
  run_program    run_program(*args, module="tinyjax.main", env=, popen=): a tinyjax program as a user starts it
  shipped_dry_run  shipped_dry_run(name): a shipped config's --dry_run plan, one program per config per session
  child_env      child_env(**changes): that program's environment (1 CPU device, the session's XLA cache)
  one_line       one_line(proc, code, expected): the one-line stop of a user mistake
  rows / stable_rows / final_sha   a workdir's metrics rows; without events and timing fields; its param_sha256s
  make_workdir   a finished run's workdir files written without training (results, compare, plot, sweep)
  make_docs / write_corpus / levanter_store / write_ledger    data written without tinyjax
  small_disk     small_disk(size) -> a tmpfs of that size (needs root; skipped otherwise)
  gcs            a local Cloud Storage emulator (gcsfs filesystem with one bucket)
  repo, marin     the checkout root; Marin's published figures bundled in tinyjax/reference/
  tok / make_run / write_checkpoint   export and sample tests (tests/export_support.py): a tokenizer trained in
                 milliseconds, make_run(tok, c=GQA, seed=0) of unit-scale params, write_checkpoint(path, tok, ...) a
                 run directory holding a real Orbax checkpoint
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import pytest

import support

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_XLA_CACHE = tempfile.mkdtemp(prefix="tinyjax-tests-xla-")
os.environ["JAX_COMPILATION_CACHE_DIR"] = _XLA_CACHE  # read by this process's jax and by every child's
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "1"

import jax  # noqa: E402  (must follow the environment above)

jax.config.update("jax_threefry_partitionable", True)
jax.config.update("jax_disable_most_optimizations", True)  # numerics stay deterministic within a run


@pytest.fixture(scope="session", autouse=True)
def _xla_cache():
  yield _XLA_CACHE
  shutil.rmtree(_XLA_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def repo():
  return support.ROOT


@pytest.fixture(scope="session")
def marin():
  """Marin's published figures as tinyjax bundles them: runs (the leaderboard table), leaderboard (enriched),
  speedrun_50m (llama_50m_muon_1x's speedrun_results.json), model_table (sizes and FLOPs/token)."""
  import types  # noqa: PLC0415

  from tinyjax import reference  # noqa: PLC0415
  return types.SimpleNamespace(runs=reference.RUNS, leaderboard=reference.LEADERBOARD,
                               speedrun_50m=reference.SPEEDRUN_50M, model_table=reference.MODEL_TABLE)


@pytest.fixture(scope="session")
def token_cache(tmp_path_factory):
  """One data.cache_dir for the session, its builtin tokenizer (vocab 512) and caches built once here."""
  from tinyjax import data  # noqa: PLC0415
  root = str(tmp_path_factory.mktemp("token_cache"))
  data.prepare(support.small_config(root))
  return root


@pytest.fixture(scope="session")
def small_cfg(token_cache):
  return lambda **overrides: support.small_config(token_cache, **overrides)


@pytest.fixture(scope="session")
def small_args(token_cache):
  return [f"--config={support.SMALL_CONFIG}", f"--config.data.cache_dir={token_cache}"]


@pytest.fixture(scope="session")
def train_run():
  return support.train_run


@pytest.fixture(scope="session")
def reference_run(small_cfg, tmp_path_factory):
  """The small config's uninterrupted run: 8 steps, evals at 4 and 8, checkpoints 4 and 8 (read-only)."""
  workdir = tmp_path_factory.mktemp("reference") / "w"
  support.train_run(small_cfg(), workdir)
  return workdir


@pytest.fixture(scope="session")
def run_program():
  return support.run_program


@pytest.fixture(scope="session")
def shipped_dry_run():
  """shipped_dry_run(name) -> the plan `python -m tinyjax.main --config=configs/NAME.py --dry_run` printed (exit 0
  checked); each config's program runs once per session (a c4 step's CPU compile is up to a minute)."""
  plans = {}

  def plan(name: str) -> dict:
    if name not in plans:
      r = support.run_program(f"--config=configs/{name}.py", "--dry_run")
      assert r.returncode == 0, r.stderr[-3000:]
      plans[name] = json.loads(r.stdout)
    return plans[name]
  return plan


@pytest.fixture(scope="session")
def child_env():
  return support.child_env


@pytest.fixture(scope="session")
def one_line():
  return support.assert_one_line


@pytest.fixture(scope="session")
def rows():
  return support.read_rows


@pytest.fixture(scope="session")
def stable_rows():
  return support.stable_rows


@pytest.fixture(scope="session")
def final_sha():
  return support.final_sha


@pytest.fixture(scope="session")
def make_workdir():
  return support.make_workdir


@pytest.fixture(scope="session")
def make_docs():
  return support.make_docs


@pytest.fixture(scope="session")
def write_corpus():
  return support.write_corpus


@pytest.fixture(scope="session")
def levanter_store():
  return support.write_levanter_store


@pytest.fixture(scope="session")
def write_ledger():
  return support.write_ledger


@pytest.fixture
def small_disk(tmp_path):
  """small_disk(size) mounts (or, called again, resizes keeping the files) a tmpfs at the returned path."""
  point = tmp_path / "disk"
  point.mkdir()
  mounted = []

  def mount(size):
    opts = f"remount,size={size}" if mounted else f"size={size}"
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(point)], capture_output=True, text=True,
                          check=False)
    if proc.returncode:
      pytest.skip(f"cannot mount a tmpfs here (needs root): {proc.stderr.strip()[:100]}")
    mounted.append(size)
    return point
  yield mount
  if mounted:
    subprocess.run(["umount", str(point)], check=False)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  import export_support  # noqa: PLC0415
  return export_support.make_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="session")
def make_run():
  import export_support  # noqa: PLC0415
  return export_support.make_run


@pytest.fixture(scope="session")
def write_checkpoint():
  import export_support  # noqa: PLC0415
  return export_support.write_checkpoint


GCS_BUCKET = "tinyjax-test"


@pytest.fixture(scope="session")
def gcs():
  """The GCS emulator (in memory, bucket `tinyjax-test`) and the environment that points gcsfs and tensorstore at it;
  yields a gcsfs filesystem."""
  pytest.importorskip("gcp_storage_emulator", reason="pip install -e '.[test]'")
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  proc = subprocess.Popen([sys.executable, support.__file__, "gcs", str(port)], stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, text=True)
  assert proc.stdout.readline().strip() == "ready"
  url = f"http://127.0.0.1:{port}"
  names = ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT")
  saved = {k: os.environ.get(k) for k in names}
  # gcsfs's newer bucket-type probe speaks gRPC, which the emulator does not: use its plain JSON-API client.
  os.environ.update(STORAGE_EMULATOR_HOST=url, TENSORSTORE_GCS_HTTP_URL=url, GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false")
  import gcsfs  # noqa: PLC0415
  fs = gcsfs.GCSFileSystem(token="anon", project="test")
  for _ in range(100):
    try:
      fs.mkdir(GCS_BUCKET)
      break
    except Exception:  # noqa: BLE001 - not listening yet
      time.sleep(0.1)
  fs.bucket = GCS_BUCKET
  yield fs
  proc.terminate()
  proc.wait(timeout=10)
  for key, value in saved.items():
    if value is None:
      os.environ.pop(key, None)
    else:
      os.environ[key] = value
