"""tinyjax.kernels.attention: every attention implementation equals the reference (forward and gradients), the
blockwise attention computes only the causal blocks, the Pallas kernels run per shard under a mesh, the train step's
memory grows linearly in seq_len with no [B, L, V] buffer, and it exports for TPU and CUDA with its kernels."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax.sharding import NamedSharding, PartitionSpec as P

from tinyjax import audit, sharding, step
from tinyjax.kernels import attention


def _inputs(B=2, L=256, G=2, R=2, K=32, dtype=jnp.float32, seed=0):
  """Random q/k/v with GQA (R query heads per kv head) and several documents per row (EOS every ~20 tokens)."""
  ks = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(ks[0], (B, L, G, R, K), dtype)
  k = jax.random.normal(ks[1], (B, L, G, K), dtype)
  v = jax.random.normal(ks[2], (B, L, G, K), dtype)
  seg = jnp.cumsum(jax.random.bernoulli(ks[3], 0.05, (B, L)), axis=1).astype(jnp.int32)
  assert int(seg[:, -1].min()) >= 3, "want several documents in every row"
  return q, k, v, seg


def _value_and_grads(impl, q, k, v, seg, **kw):
  f = lambda q, k, v: jnp.sum(jnp.sin(attention.attend(q, k, v, seg, impl, **kw).astype(jnp.float32)))
  return attention.attend(q, k, v, seg, impl, **kw), jax.grad(f, argnums=(0, 1, 2))(q, k, v)


@pytest.mark.slow
@pytest.mark.parametrize("impl,kw", [("blockwise", {"block": 64}), ("splash", {"interpret": True}),
                                     ("pallas_gpu", {"interpret": True})])
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-5), (jnp.bfloat16, 6e-2)])
def test_attention_matches_reference(impl, kw, dtype, tol):
  q, k, v, seg = _inputs(dtype=dtype)
  out, grads = _value_and_grads(impl, q, k, v, seg, **kw)
  ref, ref_grads = _value_and_grads("reference", q, k, v, seg)
  assert out.shape == ref.shape and out.dtype == ref.dtype
  err = lambda a, b: float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
  assert err(out, ref) < tol, f"{impl} forward differs from the reference einsum"
  for name, g, r in zip("qkv", grads, ref_grads):
    assert err(g, r) < tol * max(1.0, float(jnp.max(jnp.abs(r.astype(jnp.float32))))), f"d{name} of {impl}"


def test_document_mask_blocks_other_documents():
  """Changing a token's keys/values in an earlier document must not change a later document's outputs."""
  q, k, v, seg = _inputs()
  first_doc_end = int(jnp.argmax(seg[0] > 0))
  v2 = v.at[0, :first_doc_end].add(10.0)
  for impl in ("reference", "blockwise"):
    a, b = attention.attend(q, k, v, seg, impl, block=64), attention.attend(q, k, v2, seg, impl, block=64)
    np.testing.assert_array_equal(np.asarray(a[0, first_doc_end:]), np.asarray(b[0, first_doc_end:]))


def test_blockwise_attention_computes_only_causal_blocks():
  """The jaxpr of forward + backward holds the matmuls of the n(n+1)/2 causal (query block, key block) pairs only:
  2 per pair forward (scores, probs x v), 5 backward (scores again, dv, dp, dq, dk), plus the backward's
  delta = rowsum(dout * out). The full map would be n^2 = 16 pairs here, causal skipping computes 10."""
  q, k, v, seg = _inputs()  # B 2, L 256, G 2, R 2, K 32
  B, L, G, R, K = q.shape
  c = 64
  f = lambda q, k, v: jnp.sum(jnp.sin(attention.attend(q, k, v, seg, "blockwise", block=c)))
  counted = audit.jaxpr_flops(jax.make_jaxpr(jax.value_and_grad(f, argnums=(0, 1, 2)))(q, k, v))
  pair = 2 * B * G * R * c * c * K  # one [c, K] x [K, c] (or [c, c] x [c, K]) matmul per (b, g, r)
  n = L // c
  assert counted == 7 * (n * (n + 1) // 2) * pair + 2 * B * L * G * R * K


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_blockwise_attention_is_exact(dtype):
  """Output and vjp (one fixed cotangent) of the skipping blockwise attention against the reference einsum in fp32
  on the same inputs. fp32: within 1e-5 of the largest value. bf16: the output is fp32 math rounded once (2^-8
  relative per element); the gradients within one bf16 rounding of the largest value (the flash backward forms
  rowsum(dout * out) from the saved bf16 output, as the Pallas kernels do)."""
  q, k, v, seg = _inputs(dtype=dtype)
  dout = jax.random.normal(jax.random.key(9), q.shape, dtype)
  f32 = lambda x: x.astype(jnp.float32)

  def out_and_vjp(impl, *args):
    out, vjp = jax.vjp(lambda q, k, v: attention.attend(q, k, v, seg, impl, block=64), *args[:3])
    return (out, *vjp(args[3]))
  blk = jax.jit(functools.partial(out_and_vjp, "blockwise"))(q, k, v, dout)
  ref = jax.jit(functools.partial(out_and_vjp, "reference"))(f32(q), f32(k), f32(v), f32(dout))
  one_rounding = 0.0 if dtype == jnp.float32 else 2.0 ** -8
  for name, a, r in zip(("out", "dq", "dk", "dv"), blk, ref):
    assert a.dtype == dtype
    err, r = np.abs(np.asarray(f32(a)) - np.asarray(r)), np.abs(np.asarray(r))
    bound = (one_rounding * r if name == "out" else one_rounding * r.max()) + 1e-5 * r.max()
    assert np.all(err <= bound), f"{name}: worst excess {float(np.max(err - bound))}"


@pytest.mark.slow
def test_pallas_kernels_run_per_shard_under_a_mesh():
  """With the batch split over 8 devices, a Pallas kernel is wrapped in shard_map (GSPMD cannot split it)."""
  mesh = sharding.make_mesh(dataclasses.make_dataclass("M", [("data", int)])(-1))
  q, k, v, seg = _inputs(B=8)
  sh = NamedSharding(mesh, P(sharding.DATA))
  f = jax.jit(lambda *a: attention.attend(*a, "splash", interpret=True), in_shardings=(sh,) * 4)
  with jax.set_mesh(mesh):
    assert "manual_computation" in f.lower(q, k, v, seg).as_text()  # shard_map in the Shardy dialect
    out = f(q, k, v, seg)
  assert float(jnp.max(jnp.abs(out - attention.reference(q, k, v, seg)))) < 2e-5


def test_auto_picks_per_platform():
  assert attention.resolve("auto", "tpu", 4096) == "splash"
  assert attention.resolve("auto", "gpu", 1024) == "pallas_gpu"
  assert attention.resolve("auto", "cpu", 1024) == "blockwise"
  assert attention.resolve("auto", "cpu", 128) == "reference"
  assert attention.resolve("reference", "tpu", 4096) == "reference"
  with pytest.raises(ValueError, match="allowed"):
    attention.resolve("flash", "cpu", 128)


def _step_temp_bytes(cfg) -> int:
  built = step.build(cfg, sharding.make_mesh(dataclasses.make_dataclass("M", [("data", int)])(1)), eos_id=1)
  return built.planner(cfg.train.train_batch_size).info(1)["temp"]


@pytest.mark.slow
def test_step_memory_is_linear_in_seq_len_with_no_BLV_buffer(kernel_cfg):
  """Compile only (XLA's buffer assignment): doubling seq_len at most ~doubles temp memory with blockwise attention
  and loss (the reference attention's [L, L] scores grow 4x), and the whole temp is smaller than ONE fp32 [B, L, V]
  logits array."""
  temps = {}
  for impl, block in (("blockwise", 128), ("reference", 0)):
    for L in (512, 1024):
      cfg = kernel_cfg(attention=impl, loss_block_size=block, seq_len=L, vocab_size=8192, attention_block=128)
      temps[impl, L] = _step_temp_bytes(cfg)
  assert temps["blockwise", 1024] / temps["blockwise", 512] < 2.3
  assert temps["reference", 1024] / temps["reference", 512] > 2.5
  assert temps["blockwise", 1024] < 4 * 1024 * 8192 * 4, "no [B, L, V] fp32 logits buffer may exist"


@pytest.mark.parametrize("platform,impl,marker", [("tpu", "splash", "tpu_custom_call"),
                                                  ("cuda", "pallas_gpu", "__gpu$xla.gpu.triton")])
def test_train_step_exports_for_accelerators(platform, impl, marker, kernel_cfg):
  """jax.export of the real train step for TPU and CUDA on this CPU machine; the module holds the kernel's custom
  call (Mosaic on TPU; Triton on CUDA, whose call jax.export accepts only when listed in disabled_checks)."""
  cfg = kernel_cfg(attention=impl, seq_len=256, compute_dtype="bfloat16")
  built = step.build(cfg, sharding.make_mesh(dataclasses.make_dataclass("M", [("data", int)])(1)), eos_id=1)
  checks = [export.DisabledSafetyCheck.custom_call(marker)] if platform == "cuda" else []
  exported = export.export(built.make(1), platforms=[platform], disabled_checks=checks)(
      built.shapes, jax.ShapeDtypeStruct((4, 256), jnp.int32))
  assert exported.platforms == (platform,)
  assert marker in exported.mlir_module()
