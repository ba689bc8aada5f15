"""config.env reaches the process before JAX starts, is recorded, and envdiff measures what a setting changes."""
import gc
import json

import pytest

from tinyjax import config, env, envdiff, train

SMALL = ["--config.model.vocab_size=512", "--config.model.seq_len=32", "--config.train.train_batch_size=8",
         "--config.model.hidden_dim=64", "--config.model.intermediate_dim=128"]


@pytest.fixture(scope="module")
def dry_run(run_program, child_env):
  """`python -m tinyjax.main --config=configs/tiny.py --dry_run ARGS` as a user runs it (no XLA_FLAGS or
  JAX_PLATFORMS of the tests'): the plan it printed (the run checked to succeed), or with ok=False the process."""
  def dry(*args, ok=True):
    r = run_program("--config=configs/tiny.py", "--dry_run", *args, env=child_env(XLA_FLAGS=None, JAX_PLATFORMS=None),
                    timeout=120)
    if not ok:
      return r
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)
  return dry


@pytest.mark.slow  # a dry-run program (~6 s on 2 cores)
def test_env_fields_reach_the_process(dry_run):
  plan = dry_run("--config.env.host_device_count=4", "--config.env.xla_python_client_allocator=platform",
                 "--config.env.xla_python_client_preallocate=false", "--config.env.tf_gpu_allocator=cuda_malloc_async",
                 "--config.env.libtpu_init_args=--xla_tpu_scoped_vmem_limit_kib=98304",
                 "--config.env.jax_default_matmul_precision=highest", "--config.env.gpu_deterministic=True")
  assert plan["mesh"]["num_devices"] == 4, "env.host_device_count must take effect through XLA_FLAGS"
  environment = plan["env"]["environment"]
  assert environment["XLA_PYTHON_CLIENT_ALLOCATOR"] == "platform"
  assert environment["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
  assert environment["TF_GPU_ALLOCATOR"] == "cuda_malloc_async"
  assert environment["LIBTPU_INIT_ARGS"] == "--xla_tpu_scoped_vmem_limit_kib=98304"
  assert "--xla_gpu_deterministic_ops=true" in environment["XLA_FLAGS"]
  assert plan["env"]["jax_config"]["jax_default_matmul_precision"] == "highest"


@pytest.mark.slow  # a dry-run program and XLA's flag probe (~8 s on 2 cores)
def test_xla_flags_list_and_config_wins_over_environment(dry_run):
  plan = dry_run("--config.env.xla_flags=('--xla_force_host_platform_device_count=8',)",
                 "--config.env.host_device_count=2")
  assert plan["mesh"]["num_devices"] == 8, "a later --flag=value must replace an earlier one"
  assert plan["env"]["environment"]["XLA_FLAGS"] == "--xla_force_host_platform_device_count=8"


@pytest.mark.slow  # two dry-run programs (~10 s on 2 cores)
def test_a_requested_platform_that_is_absent_is_one_line_not_a_cpu_run(dry_run):
  r = dry_run("--config.env.platform=tpu", ok=False)
  assert r.returncode == 2, r.stderr[-2000:]
  assert r.stderr.strip().splitlines()[-1].startswith("tinyjax: error: config.env.platform='tpu'")
  assert "Traceback" not in r.stderr
  plan = dry_run("--config.env.platform=cpu")
  assert plan["env"]["backend"] == "cpu" and plan["env"]["jax_config"]["jax_platforms"] == "cpu"


def test_refused_after_backend_start():
  import jax
  jax.devices()  # the test process's backend is up
  with pytest.raises(config.ConfigError, match="before the JAX backend starts"):
    env.apply(config.base().env)


def test_both_mem_fractions_refused():
  e = config.base().env
  e.xla_client_mem_fraction, e.xla_python_client_mem_fraction = "0.5", "0.5"
  with pytest.raises(config.ConfigError, match="both set"):
    env.apply(e)


@pytest.mark.parametrize("kind,why", [("file", "it is a file"), ("unwritable", "")])
def test_compilation_cache_dir_must_be_a_writable_directory(tmp_path, kind, why):
  e = config.base().env
  e.compilation_cache_dir = str(tmp_path / "cache.bin") if kind == "file" else "/proc/tinyjax-cache"
  (tmp_path / "cache.bin").write_text("not a directory")
  with pytest.raises(config.ConfigError, match=rf"^config\.env\.compilation_cache_dir='{e.compilation_cache_dir}' is "
                                               rf"not a writable directory \({why}"):
    env.apply(e)
  assert (tmp_path / "cache.bin").read_text() == "not a directory"


def test_gc_policy_restored():
  train.gc_policy("freeze")
  assert gc.get_freeze_count() > 0
  train.gc_policy("disable")
  assert not gc.isenabled()
  train.gc_policy("default")
  assert gc.isenabled() and gc.get_freeze_count() == 0


@pytest.fixture(scope="module")
def preallocate_report(tmp_path_factory):
  out = tmp_path_factory.mktemp("envdiff")
  report = envdiff.main(["--config=configs/tiny.py", "--a", "env.xla_python_client_preallocate=true",
                         "--b", "env.xla_python_client_preallocate=false", "--steps=4", f"--out={out}", "--",
                         *SMALL])
  return report, out


@pytest.mark.slow  # two fresh training processes (~40 s on 2 cores)
def test_envdiff_cpu_irrelevant_flag_is_bitwise_identical(preallocate_report):
  """Also the determinism check: two fresh CPU processes of the same training are bitwise identical."""
  report, out = preallocate_report
  assert report["bitwise_identical"] and report["loss"]["first_differing_step"] is None
  assert report["steps"] == [1, 2, 3, 4]
  assert json.load(open(out / "envdiff.json"))["bitwise_identical"] is True


@pytest.mark.slow  # shares the envdiff run above
def test_run_info_records_the_run(preallocate_report):
  _, out = preallocate_report
  info = json.load(open(out / "a" / "run_info.json"))
  assert info["env"]["environment"]["XLA_PYTHON_CLIENT_PREALLOCATE"] == "true"
  for key in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "tensorstore", "tokenizers", "python"):
    assert key in info["versions"], key
  # envdiff's processes inherit this test process's environment: 8 fake CPU devices (conftest).
  assert info["devices"]["backend"] == "cpu" and info["devices"]["device_count"] == 8 == info["mesh"]["num_devices"]
  assert info["devices"]["process_count"] == 1 and info["host"]
  assert info["git"] is None or {"commit", "dirty", "diff_sha256"} <= info["git"].keys()
  assert len(info["config_sha256"]) == 64 and info["status"] == "completed"
  assert info["start_time"] <= info["end_time"]


@pytest.mark.slow  # two fresh training processes (~35 s on 2 cores)
def test_envdiff_reports_a_real_difference(tmp_path):
  report = envdiff.main(["--config=configs/tiny.py", "--a", "seed=0", "--b", "seed=1", "--steps=2",
                         f"--out={tmp_path}", "--", *SMALL])
  assert not report["bitwise_identical"] and report["loss"]["first_differing_step"] == 1
  assert report["loss"]["max_abs_diff"] > 0 and not report["final_params_identical"]
