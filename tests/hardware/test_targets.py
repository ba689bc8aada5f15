"""Targets by name, deviceless compiles with the TPU and GPU compilers, envdiff on a target, and plugin isolation."""
import json
import os

import pytest

from tinyjax import cli, envdiff, plan, sharding
from tinyjax.errors import ConfigError
from tinyjax import aot
from tinyjax.hardware import hlo, roofline, targets
from tinyjax.kernels import attention

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GIB = 2 ** 30


@pytest.mark.parametrize("name,chips,hosts,topology", [
    ("v4-8", 4, 1, "v4:2x2x1"), ("v4-32", 16, 4, "v4:2x2x4"), ("v4-128", 64, 16, "v4:4x4x4"),
    ("v5p-8", 4, 1, "v5p:2x2x1"), ("v5p-16", 8, 2, "v5p:2x2x2"), ("v5p-32", 16, 4, "v5p:2x2x4"),
    ("v5p-64", 32, 8, "v5p:2x4x4"), ("v5e-8", 8, 1, "v5e:2x4"), ("v5litepod-16", 16, 4, "v5e:4x4"),
    ("v6e-8", 8, 1, "v6e:2x4"), ("v6e-256", 256, 64, "v6e:16x16")])
def test_tpu_slices_are_counted_as_cloud_tpu_counts_them(name, chips, hosts, topology):
  """v4/v5p-N name TensorCores (N/2 chips, 4 per host); v5e/v6e-N name chips (one host up to 8)."""
  t = targets.parse(name)
  assert (t.platform, t.chips, t.hosts, t.topology) == ("tpu", chips, hosts, topology)


def test_gpu_targets_and_unknown_names():
  h100 = targets.parse("h100")
  assert (h100.platform, h100.chips, h100.topology) == ("cuda", 1, "1x1x1")
  assert h100.memory_bytes == 84942979072, "the driver's figure for an 80 GB H100, from the target config file"
  assert targets.parse("h200").memory_bytes == 151397597184
  assert targets.parse("a100-40gb").memory_bytes == 42331013120
  assert targets.parse("a100-80gb").memory_bytes == 85100068864
  assert targets.parse("8xH100").topology == "1x1x8"
  for bad in ("h300", "v5p-12", "v5e-2", "v7-8", "9xh100"):
    with pytest.raises(ConfigError, match="--target="):
      targets.parse(bad)


HLO = """HloModule jit_step_1, entry_computation_layout={(f32[8]{0})->f32[8]{0}}

%fused (p: f32[8]) -> f32[8] {
  %p = f32[8]{0} parameter(0)
  ROOT %m = f32[8]{0} multiply(f32[8]{0} %p, f32[8]{0} %p), metadata={op_name="jit(step)/mul" source_file="/a.py"}
}

ENTRY %main (x: f32[8]) -> f32[8] {
  %x = f32[8]{0} parameter(0)
  %f = f32[8]{0} fusion(f32[8]{0} %x), kind=kLoop, calls=%fused
  ROOT %k = f32[8]{0} custom-call(f32[8]{0} %f), custom_call_target="tpu_custom_call", metadata={op_name="k"}
}
"""


def test_compiled_module_readers():
  assert hlo.custom_calls(HLO) == ["tpu_custom_call"]
  moved = HLO.replace("jit_step_1", "jit_step_7").replace('source_file="/a.py"', 'source_file="/b.py"')
  assert hlo.fingerprint(moved) == hlo.fingerprint(HLO), "module name and source metadata are not the program"
  assert hlo.fingerprint(HLO.replace("multiply", "add")) != hlo.fingerprint(HLO)
  s = hlo.summary(HLO)
  assert s["ops"] == {"custom-call": 1, "fusion": 1, "multiply": 1, "parameter": 2}
  assert s["fusions"] == {"kLoop": 1} and s["kernels"] == {"tpu_custom_call": 1}


def test_envdiff_names_allocator_only_settings():
  assert envdiff.allocator_only(["XLA_PYTHON_CLIENT_MEM_FRACTION=0.9", "env.xla_python_client_preallocate=false"])
  assert not envdiff.allocator_only(["XLA_FLAGS=--xla_gpu_enable_triton_gemm=false"])
  a = {"hlo_fingerprint": "x", "temp_gib": 1.0, "peak_gib": 2.0, "usable_gib": 59.3, "fits": True,
       "program": {"ops": {"dot": 4, "fusion": 9}, "fusions": {"kLoop": 9}, "kernels": {}}}
  b = {**a, "hlo_fingerprint": "y", "program": {"ops": {"dot": 4, "fusion": 7}, "fusions": {"kLoop": 7},
                                                "kernels": {"__cublas$gemm": 2}}}
  d = envdiff.compare_programs(a, b)
  assert d["program_identical"] is False
  assert d["changed"] == {"ops": {"fusion": [9, 7]}, "fusions": {"kLoop": [9, 7]}, "kernels": {"__cublas$gemm": [0, 2]}}


def _config(name: str, *overrides: str):
  return cli.load_config([f"--config={ROOT}/configs/{name}.py", *overrides])


@pytest.mark.slow
def test_missing_compiler_gives_labelled_cpu_proxy_figures(monkeypatch, capsys):
  """Without libtpu the plan still answers, from this machine's compiler, and says so (stderr note + label)."""
  monkeypatch.setattr(targets, "compiler_installed", lambda platform: False)
  cfg = _config("tiny")
  out = plan.dry_run(cfg, sharding.make_mesh(cfg.mesh), {}, True, "v5p-8")["memory"]["targets"]["v5p-8"]
  assert out["compiler"].startswith("cpu-proxy") and "tpu-compile" in out["compiler"]
  assert out["per_device_batch"] == 4 and out["chips"] == 4 and out["attention"] == "reference", "the CPU's kernel"
  assert out["fits"] is True and out["grad_accum_steps"] == 1 and out["kernels"] is None
  assert "figures are CPU proxies" in capsys.readouterr().err
  with pytest.raises(ConfigError, match="tpu-compile"):
    aot.preflight([f"--config={ROOT}/configs/tiny.py"], "v5p-8")
  with pytest.raises(ConfigError, match="add --dry_run"):
    plan.dry_run(cfg, None, {}, False, "v5p-8")


def test_compile_only_plugins_stay_unloaded_in_a_cpu_run(run_program, child_env):
  """The compile extras install libtpu and the CUDA PJRT plugin; a run on a machine without TPU/GPU loads neither."""
  code = ("import json, jax; from tinyjax import config, env; r = env.apply(config.base().env); jax.devices(); "
          "print(json.dumps([r.get('skipped_plugins', []), jax.default_backend()]))")
  r = run_program(code=code, env=child_env(JAX_PLATFORMS=None, XLA_FLAGS=None), timeout=120)
  installed = [p for p in ("tpu", "cuda") if targets.compiler_installed(p)]
  assert r.returncode == 0, r.stderr
  assert json.loads(r.stdout.splitlines()[-1]) == [installed, "cpu"]
  assert r.stderr.strip() == "", "neither plugin may print (libtpu warnings, the CUDA plugin's traceback)"


needs_tpu = pytest.mark.skipif(not targets.compiler_installed("tpu"), reason="pip install -e '.[tpu-compile]'")
needs_cuda = pytest.mark.skipif(not targets.compiler_installed("cuda"), reason="pip install -e '.[cuda-compile]'")


@pytest.mark.slow
@needs_tpu
@needs_cuda
def test_tiny_compiles_for_a_tpu_slice_and_an_h100_with_their_kernels(tmp_path):
  cfg = _config("tiny", "--config.model.num_layers=1")  # one of tiny's layers: the same kernels, compiled faster
  tpu, gpu = aot.plan(cfg, targets.parse("v5p-8"), hlo_dir=str(tmp_path)), aot.plan(cfg, targets.parse("h100"))
  module = (tmp_path / "v5p-8.hlo.txt").read_text()  # --hlo_dir: the module the roofline was read from
  assert module.startswith("HloModule") and hlo.fingerprint(module) == tpu["hlo_fingerprint"]
  assert not (tmp_path / "h100.hlo.txt").exists()
  for p, chip in ((tpu, targets.parse("v5p-8").chip), (gpu, targets.parse("h100").chip)):
    line = p["roofline"]
    assert line["peak_flops"] == chip.peak_flops and line["hbm_bandwidth"] == chip.hbm_bandwidth
    assert line["unknown_trip_counts"] == 0 and line["bound_s"] >= max(line["memory_s"], line["flops_s"])
    assert line["mfu_ceiling"] == pytest.approx(line["compute_s"] / line["bound_s"])
  assert tpu["roofline"]["compiler_estimate"]["optimal_seconds"] > 0, "libtpu's own estimate, beside ours"
  assert gpu["roofline"]["compiler_estimate"] is None, "the CUDA plugin has no cost analysis"
  assert tpu["compiler"].startswith("libtpu ") and tpu["device_kind"] == "TPU v5" and tpu["mesh"]["data"] == 4
  assert tpu["attention"] == "splash" and "tpu_custom_call" in tpu["kernels"], "splash through Mosaic"
  assert gpu["compiler"].startswith("XLA GPU") and gpu["device_kind"] == "NVIDIA H100 80GB HBM3"
  assert gpu["attention"] == "pallas_gpu" and "__gpu$xla.gpu.triton" in gpu["kernels"], "attention through Triton"
  for p in (tpu, gpu):
    assert p["fits"] is True and p["grad_accum_steps"] == 1 and 0 < p["temp_gib"] < 1


def _shipped_attention_shapes() -> set[tuple[int, int, int, int]]:
  """(seq_len, heads, kv heads, head_dim) of every shipped config, plus a grouped-query (GQA) variant of tiny."""
  shapes = set()
  for name in sorted(os.listdir(os.path.join(ROOT, "configs"))):
    if name.endswith(".py"):
      m = _config(name[:-3]).model
      shapes.add((m.seq_len, m.num_heads, m.num_kv_heads, m.hidden_dim // m.num_heads))
  return shapes | {(128, 4, 2, 64)}


def _kernels_in_attention_compile(platform: str, shape, monkeypatch) -> list[str]:
  """Forward + backward of the platform's attention kernel (bf16, segment ids) compiled by the real compiler."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415
  from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec  # noqa: PLC0415

  for key, value in aot.CHILD_ENV.items():
    monkeypatch.setenv(key, value)
  target = targets.parse({"tpu": "v5p-8", "cuda": "h100"}[platform])
  mesh = Mesh(np.asarray(aot.topology(target).devices[:1]), ("data",), axis_types=(AxisType.Auto,))
  L, H, G, K = shape
  replicated = NamedSharding(mesh, PartitionSpec())
  spec = lambda *s: jax.ShapeDtypeStruct(s, jnp.bfloat16, sharding=replicated)
  seg = jax.ShapeDtypeStruct((2, L), jnp.int32, sharding=replicated)
  impl = attention.resolve("auto", platform, L)
  loss = lambda q, k, v, s: attention.attend(q, k, v, s, impl).astype(jnp.float32).sum()
  with jax.set_mesh(mesh):
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(
        spec(2, L, G, H // G, K), spec(2, L, G, K), spec(2, L, G, K), seg).compile()
  return hlo.custom_calls(compiled.as_text())


@pytest.mark.slow
@needs_tpu
@needs_cuda
def test_attention_kernels_compile_through_mosaic_and_triton_for_every_shipped_shape(monkeypatch):
  """Splash (TPU, Mosaic) and the Pallas GPU kernel (Triton) accepted by the real compilers at every shipped config's
  shape; a kernel the compiler rejects fails here (it must be fixed, not skipped)."""
  kernel = {"splash": "tpu_custom_call", "pallas_gpu": "__gpu$xla.gpu.triton"}
  seen = set()
  for shape in sorted(_shipped_attention_shapes()):
    for platform in ("tpu", "cuda"):
      impl = attention.resolve("auto", platform, shape[0])  # stability_tiny's 64 tokens are below splash's blocks
      compiled = _kernels_in_attention_compile(platform, shape, monkeypatch)
      assert (kernel[impl] in compiled) if impl in kernel else compiled == [], (platform, shape, compiled)
      seen.add(impl)
  assert seen == {"splash", "pallas_gpu", "reference"}


@pytest.mark.slow
@needs_tpu
@needs_cuda
def test_marin_configs_fit_marins_hardware_by_its_own_compilers():
  """c4_50m on one H100 (128 x 1024, no accumulation) and c4_130m on a v5p-32 (16 chips, 8 x 4096 per chip)."""
  gpu = aot.plan(_config("c4_50m"), targets.parse("h100"))
  assert gpu["per_device_batch"] == 128 and gpu["grad_accum_steps"] == 1 and gpu["fits"] is True
  assert "__gpu$xla.gpu.triton" in gpu["kernels"] and gpu["peak_gib"] < gpu["usable_gib"]
  tpu = aot.plan(_config("c4_130m"), targets.parse("v5p-32"))
  assert (tpu["chips"], tpu["hosts"], tpu["mesh"]["data"], tpu["per_device_batch"]) == (16, 4, 16, 8)
  assert tpu["grad_accum_steps"] == 1 and tpu["fits"] is True and "tpu_custom_call" in tpu["kernels"]
  # The roofline of the step (BUILD_NOTES): with the Pallas loss no block's logits reach HBM, so c4_50m moves ~32 GB
  # per H100 step (322 GB with the XLA fused loss) and is compute-bound in the loss: MFU ceiling ~0.62 (0.23), at
  # 1.27x the FLOPs Marin credits (the loss recomputes its logits once).
  line = gpu["roofline"]
  assert 25e9 < line["hbm_bytes"] < 40e9 and 0.60 <= line["mfu_ceiling"] < 0.66
  assert line["by_part"]["loss"]["share"] > 0.7 and 1.25 < line["executed_over_credited"] < 1.30
  assert any(k["name"].startswith("pallas_call") and "pallas_loss_dx" in k["op"] for k in line["top"])
  assert tpu["roofline"]["unknown_trip_counts"] == 0 and tpu["roofline"]["by_part"]["collectives"]["bound_s"] > 0


@pytest.mark.slow
@needs_tpu
@needs_cuda
def test_c4_50m_state_traffic_and_ceiling_on_an_h100_and_a_v5p_8(tmp_path):
  """The guard checks the candidate state in one reduction pass and the selects write it in one more (step.py): the
  update and guard kernels of c4_50m move 3.9 GB per H100 step and 2.7 GB per v5p chip (4.1 and 3.4 GB when XLA
  wrote the candidate out and selected from it), which puts the v5p-8 step's MFU ceiling over 0.60 (0.5998)."""
  for name, most, ceiling in (("h100", 4.0e9, 0.62), ("v5p-8", 3.0e9, 0.60)):
    line = aot.plan(_config("c4_50m"), targets.parse(name), hlo_dir=str(tmp_path))["roofline"]
    with open(tmp_path / f"{name}.hlo.txt") as f:
      ks, _ = roofline.kernels(f.read())
    state = sum(k.trips * k.hbm_bytes for k in ks if "/guard/" in k.op_name or "/optimizer/" in k.op_name)
    assert 1.5e9 < state < most, (name, state)
    assert line["mfu_ceiling"] >= ceiling, (name, line["mfu_ceiling"])


def test_auto_attention_follows_the_target_platform():
  """A step traced for a target uses the target's kernel; splash only where its 128-lane blocks fit the window."""
  assert attention.resolve("auto", "tpu", 4096) == "splash" and attention.resolve("auto", "cuda", 1024) == "pallas_gpu"
  assert attention.resolve("auto", "tpu", 64) == "reference" and attention.resolve("auto", "cpu", 1024) == "blockwise"
  cfg = _config("stability_tiny", "--config.model.attention=splash")
  with pytest.raises(ConfigError, match="multiple of 128"):
    from tinyjax import config  # noqa: PLC0415
    config.validate(cfg)


@pytest.mark.slow
@needs_cuda
def test_envdiff_on_an_h100_tells_a_codegen_flag_from_an_allocator_setting(tmp_path):
  """Disabling Triton GEMM fusion changes the H100 program (cuBLAS instead); the memory fraction cannot."""
  small = ["--config.model.num_layers=1", "--config.optimizer.name=adamw"]  # the same story, compiled faster
  base = [f"--config={ROOT}/configs/tiny.py", "--target=h100", "--out"]
  r = envdiff.main([*base, str(tmp_path / "a"), "--a", "XLA_FLAGS=--xla_gpu_enable_triton_gemm=false", "--", *small])
  assert r["program_identical"] is False and r["allocator_only"] is False
  gemm = r["changed"]["fusions"]["backend:__triton_nested_gemm_fusion"]
  assert gemm[0] == 0 < gemm[1] and r["changed"]["kernels"]["__cublas$lt$matmul"][1] == 0
  r = envdiff.main([*base, str(tmp_path / "b"), "--a", "XLA_PYTHON_CLIENT_MEM_FRACTION=0.9", "--", *small])
  assert r["program_identical"] is True and r["allocator_only"] is True and r["changed"] == {}
  assert r["memory"]["usable_gib"][0] == pytest.approx(0.9 * 79.11, abs=0.02) and r["memory"]["usable_gib"][1] == 59.33
