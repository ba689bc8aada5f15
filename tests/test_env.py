"""config.env reaches the process before JAX starts, is recorded, and envdiff measures what a setting changes."""
import gc
import json
import os

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
  assert report["env_differences"] == ["environment.XLA_PYTHON_CLIENT_PREALLOCATE: true | false"]
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
  assert info["env"]["host_cpu"] == env.host_cpu()  # this machine's CPU, as the process saw it
  assert info["git"] is None or {"commit", "dirty", "diff_sha256"} <= info["git"].keys()
  assert len(info["config_sha256"]) == 64 and info["status"] == "completed"
  assert info["start_time"] <= info["end_time"]


@pytest.mark.slow  # two fresh training processes (~35 s on 2 cores)
def test_envdiff_reports_a_real_difference(tmp_path):
  report = envdiff.main(["--config=configs/tiny.py", "--a", "seed=0", "--b", "seed=1", "--steps=2",
                         f"--out={tmp_path}", "--", *SMALL])
  assert not report["bitwise_identical"] and report["loss"]["first_differing_step"] == 1
  assert report["loss"]["max_abs_diff"] > 0 and not report["final_params_identical"]


def test_only_library_settings_are_recorded(monkeypatch):
  """TF_ is TensorFlow's/XLA's and Terraform's prefix: only the TF_ variables XLA's runtime reads are settings."""
  monkeypatch.setenv("TF_CLI_CONFIG_FILE", "/root/.terraformrc")  # Terraform's
  monkeypatch.setenv("TF_VAR_region", "x")
  monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "1")
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_max_isa=AVX2")
  recorded = env.record()["environment"]
  assert "TF_CLI_CONFIG_FILE" not in recorded and "TF_VAR_region" not in recorded
  assert recorded["TF_CPP_MIN_LOG_LEVEL"] == "1" and recorded["XLA_FLAGS"] == "--xla_cpu_max_isa=AVX2"
  assert [env.recorded(v) for v in ("JAX_PLATFORMS", "LIBTPU_INIT_ARGS", "NCCL_DEBUG", "CUDA_VISIBLE_DEVICES",
                                    "TF_GPU_ALLOCATOR", "TF_LOG", "TFHUB_CACHE_DIR", "HOME")] == [
      True, True, True, True, True, False, False, False]


SAPPHIRE_RAPIDS = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 143
model name\t: Intel(R) Xeon(R) Platinum 8480+
stepping\t: 8
flags\t\t: fpu sse4_2 avx avx2 fma avx512f avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8

processor\t: 1
model name\t: something else
"""


def _cache(root, index, level, kind, size):
  d = root / f"index{index}"
  d.mkdir(parents=True)
  for name, value in (("level", level), ("type", kind), ("size", size)):
    (d / name).write_text(value + "\n")


def test_host_cpu(tmp_path):
  for i, (level, kind, size) in enumerate([("1", "Data", "48K"), ("1", "Instruction", "32K"), ("2", "Unified", "2048K"),
                                           ("3", "Unified", "107520K")]):
    _cache(tmp_path, i, level, kind, size)
  host = env.host_cpu(SAPPHIRE_RAPIDS, str(tmp_path), xla_flags="")
  assert {k: host[k] for k in ("model", "vendor", "family_model_stepping", "cpu_isa", "xla_isa", "caches")} == {
      "model": "Intel(R) Xeon(R) Platinum 8480+", "vendor": "GenuineIntel", "family_model_stepping": "6/143/8",
      "cpu_isa": "AMX", "xla_isa": "AMX", "caches": {"L1d": "48K", "L1i": "32K", "L2": "2048K", "L3": "107520K"}}
  capped = env.host_cpu(SAPPHIRE_RAPIDS, str(tmp_path), xla_flags="--xla_cpu_max_isa=avx2 --xla_foo=1")
  assert (capped["cpu_isa"], capped["xla_isa"]) == ("AMX", "AVX2")
  assert env.host_cpu(SAPPHIRE_RAPIDS, str(tmp_path), xla_flags="--xla_cpu_max_isa=AMX_FP16")["xla_isa"] == "AMX"
  bare = env.host_cpu("", str(tmp_path / "none"), xla_flags="")
  assert (bare["model"], bare["cpu_isa"], bare["caches"]) == (None, None, {})
  assert bare["usable_cpus"] == len(os.sched_getaffinity(0)) and bare["cpu_count"] == os.cpu_count()


def _finished(workdir, losses, sha, host):
  workdir.mkdir()
  rows = [{"step": s, "loss": l, "param_norm": 10.0} for s, l in losses.items()]
  (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows + [{"step": 2, "param_sha256": sha}]))
  (workdir / "run_info.json").write_text(json.dumps({"env": {"environment": {"XLA_FLAGS": "--a"}, "jax_config": {},
                                                             "host_cpu": host}}))
  return str(workdir)


def test_envdiff_names_a_host_difference(tmp_path, capsys):
  """Two finished runs from two machines: the step that first differs, and the host facts that differ."""
  amd = {"model": "AMD EPYC", "xla_isa": "AVX512_BF16", "caches": {"L2": "1024K"}, "usable_cpus": 2}
  intel = {**amd, "model": "Intel(R) Xeon(R) Platinum 8480+", "xla_isa": "AMX"}
  a = _finished(tmp_path / "a", {1: 8.7860, 2: 8.5}, "5c74", amd)
  b = _finished(tmp_path / "b", {1: 8.7861, 2: 8.5}, "4666", intel)
  report = envdiff.main(["--runs", a, b])
  assert report["loss"]["first_differing_step"] == 1 and not report["bitwise_identical"]
  assert report["env_differences"] == ["host_cpu.model: AMD EPYC | Intel(R) Xeon(R) Platinum 8480+",
                                       "host_cpu.xla_isa: AVX512_BF16 | AMX"]
  out = capsys.readouterr().out
  assert "recorded settings and host: differ (A | B):\n  host_cpu.model: AMD EPYC | Intel(R) Xeon(R) Platinum 8480+" in out
  assert envdiff.main(["--runs", a, a])["env_differences"] == []


def test_envdiff_runs_errors(tmp_path, capsys):
  with pytest.raises(SystemExit) as e:
    envdiff.main(["--runs", str(tmp_path), str(tmp_path)])
  assert e.value.code == 2
  assert capsys.readouterr().err.startswith(f"tinyjax: error: {tmp_path}: not a finished tinyjax run (")
  with pytest.raises(SystemExit) as e:
    envdiff.main([])
  assert capsys.readouterr().err == "tinyjax: error: --config=FILE is required (or --runs WORKDIR_A WORKDIR_B)\n"
