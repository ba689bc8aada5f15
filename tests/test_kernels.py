"""Every attention implementation and both losses equal their references (forward and gradients), the blockwise
attention computes only the causal blocks, the fused loss runs per shard under a mesh, memory grows linearly in
seq_len with no [B, L, V] buffer, and the train step exports for TPU and CUDA with its kernels."""
import contextlib
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax.sharding import NamedSharding, PartitionSpec as P

from tinyjax import audit, config, sharding, step
from tinyjax.kernels import attention, loss
from tinyjax.model import ModelConfig, Transformer, next_token_loss


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


def _tiny_cfg(**model):
  cfg = config.base()
  m = cfg.model
  m.hidden_dim, m.intermediate_dim, m.num_layers, m.num_heads, m.num_kv_heads = 32, 64, 2, 4, 2
  m.seq_len, m.vocab_size, m.compute_dtype = 64, 384, "float32"
  for key, value in model.items():
    m[key] = value
  cfg.train.train_batch_size, cfg.train.num_train_steps = 4, 10
  return cfg


def _doc_tokens(B=4, L=64, V=384, seed=4):
  """Random tokens with an EOS (id 1) about every 12 tokens: several documents per row (numpy: no compiles)."""
  rng = np.random.default_rng(seed)
  tokens = np.where(rng.random((B, L)) < 1 / 12, 1, rng.integers(2, V, (B, L)))
  assert int((tokens == 1).sum(axis=1).min()) >= 2, "want several documents in every row"
  return jnp.asarray(tokens, jnp.int32)


def _loss_fn(model):
  """The train step's loss (z-loss 1e-3): params, tokens -> (loss, mean NLL)."""
  return lambda params, tokens_BL: next_token_loss(model, params, tokens_BL, 1e-3)


@functools.lru_cache(maxsize=None)
def _training_loss_and_grads(block: int, loss_impl: str):
  """Loss, NLL and gradients of the train step's loss (z-loss 1e-3) on _doc_tokens, with blockwise attention (block 16)."""
  tokens = _doc_tokens()
  cfg = _tiny_cfg(loss_block_size=block, loss_impl=loss_impl, attention="blockwise", attention_block=16)
  model = Transformer(ModelConfig.from_config(cfg.model), eos_id=1)
  params = jax.jit(model.init)(jax.random.key(0), tokens)["params"]
  return jax.jit(jax.value_and_grad(_loss_fn(model), has_aux=True))(params, tokens)


@pytest.mark.parametrize("loss_impl", ["fused", "blockwise"])
def test_training_loss_equals_unblocked_reference_in_fp32(loss_impl):
  """Loss, z-loss and every gradient of the real loss function (several documents per row): the fused /
  rematerialised loss in blocks of 48 tokens (not dividing B*L) vs the unblocked reference, <= 1e-5 relative."""
  (total0, nll0), g0 = _training_loss_and_grads(0, "fused")  # loss_block_size 0: unblocked, JAX's autodiff
  (total1, nll1), g1 = _training_loss_and_grads(48, loss_impl)
  assert float(total1) == pytest.approx(float(total0), rel=1e-5)
  assert float(nll1) == pytest.approx(float(nll0), rel=1e-5)
  assert float(total0 - nll0) > 0, "the z-loss term is part of the comparison"
  # The z-loss term as a difference of two ~6-nat sums: equal within their fp32 rounding (its own value is pinned to
  # 1e-5 relative by test_fused_loss_equals_unblocked_reference).
  assert abs(float((total1 - nll1) - (total0 - nll0))) <= 1e-5 * float(total0)
  for path, a, b in zip(jax.tree_util.tree_leaves_with_path(g0), jax.tree.leaves(g0), jax.tree.leaves(g1)):
    scale = float(jnp.max(jnp.abs(a)))
    assert float(jnp.max(jnp.abs(a - b))) <= 1e-5 * scale + 1e-9, f"gradient of {path[0]}"


def _reference_loss(x_BLD, head_DV, t_BL, w_BL, z, dtype):
  """(Σ w·(nll + z·logz²), (Σ w·nll, Σ w·logz²)): the unblocked loss in fp32 arithmetic with the compute dtype's
  roundings where the kernel makes them: matmul inputs (straight-through), the logits (the compute-dtype dot's
  output) and, by autodiff of that cast, their cotangent (the backward matmuls' input)."""
  rnd = lambda a: a + jax.lax.stop_gradient(a.astype(dtype).astype(jnp.float32) - a)
  logits_NV = jnp.dot(rnd(x_BLD).reshape(-1, x_BLD.shape[-1]), rnd(head_DV), precision="highest")
  logits_NV = logits_NV.astype(dtype).astype(jnp.float32)
  logz_N = jax.nn.logsumexp(logits_NV, axis=-1)
  nll_N = logz_N - jnp.take_along_axis(logits_NV, t_BL.reshape(-1, 1), axis=-1)[:, 0]
  w_N = w_BL.reshape(-1)
  nll, z_sum = jnp.sum(w_N * nll_N), jnp.sum(w_N * logz_N ** 2)
  return nll + z * z_sum, (nll, z_sum)


def _exact_compile(f, *args):
  """f compiled with xla_allow_excess_precision off, then run: XLA:CPU otherwise drops bf16 round trips inside loop
  bodies only, so a blocked and an unblocked program would round at different places."""
  return jax.jit(f).lower(*args).compile(compiler_options={"xla_allow_excess_precision": False})(*args)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fused_loss_equals_unblocked_reference(dtype):
  """The fused kernel (blocks of 48 of 120 tokens: a padded last block) against autodiff of the unblocked loss:
  loss, NLL, z-loss and the gradients of x and the lm_head within 1e-5 relative, in fp32 and in bf16 compute."""
  ks = jax.random.split(jax.random.key(0), 3)
  x_BLD, head_DV = jax.random.normal(ks[0], (3, 40, 16)), 0.5 * jax.random.normal(ks[1], (16, 300))
  t_BL = jax.random.randint(ks[2], (3, 40), 0, 300)
  mask_BL = jnp.ones((3, 40)).at[:, -1].set(0.0)
  w_BL = mask_BL / mask_BL.sum()
  fused = lambda x, h: loss.fused_loss(x, h, t_BL, w_BL, 1e-2, 48, dtype)
  ref = lambda x, h: _reference_loss(x, h, t_BL, w_BL, 1e-2, dtype)
  grad = lambda f: jax.value_and_grad(f, argnums=(0, 1), has_aux=True)
  (total, nll), grads = _exact_compile(grad(fused), x_BLD, head_DV)
  (ref_total, (ref_nll, ref_z)), ref_grads = _exact_compile(grad(ref), x_BLD, head_DV)
  (_, z_sum), _, _ = _exact_compile(lambda x, h: loss._loss_and_grads(x, h, t_BL, w_BL, 1e-2, 48, dtype),
                                    x_BLD, head_DV)  # the z-loss sum on its own
  assert float(total) == pytest.approx(float(ref_total), rel=1e-5)
  assert float(nll) == pytest.approx(float(ref_nll), rel=1e-5)
  assert float(z_sum) == pytest.approx(float(ref_z), rel=1e-5)
  for name, g, r in zip(("x", "lm_head"), grads, ref_grads):
    assert g.dtype == jnp.float32, "gradients come back in the inputs' dtype"
    assert float(jnp.max(jnp.abs(g - r))) <= 1e-5 * float(jnp.max(jnp.abs(r))), f"d{name}"


def test_fused_loss_backward_only_scales():
  """The custom VJP's backward is the forward's gradients times the cotangent (here 3), and the NLL output and the
  weights carry no gradient."""
  x_BLD, head_DV = jax.random.normal(jax.random.key(0), (2, 8, 4)), jax.random.normal(jax.random.key(1), (4, 11))
  t_BL, w_BL = jnp.zeros((2, 8), jnp.int32), jnp.full((2, 8), 1 / 16)
  f = lambda x, h, w: loss.fused_loss(x, h, t_BL, w, 0.0, 5, "float32")
  g1 = jax.jit(jax.grad(lambda *a: f(*a)[0], argnums=(0, 1, 2)))(x_BLD, head_DV, w_BL)
  g3 = jax.jit(jax.grad(lambda *a: 3.0 * f(*a)[0], argnums=(0, 1)))(x_BLD, head_DV, w_BL)
  for a, b in zip(g1[:2], g3):
    np.testing.assert_allclose(np.asarray(b), 3.0 * np.asarray(a), rtol=1e-6)
  assert not np.any(np.asarray(g1[2])), "weights are statistics"
  g_nll = jax.jit(jax.grad(lambda x: f(x, head_DV, w_BL)[1]))(x_BLD)
  assert not np.any(np.asarray(g_nll)), "the NLL output is a statistic"


def _one_step(cfg, data_devices: int, fsdp: bool, tokens, in_mesh: bool):
  """(step metrics, params) after one train step of cfg on `data_devices` devices, traced inside the mesh or not,
  and the step's lowered text."""
  cfg.mesh.data, cfg.mesh.fsdp = data_devices, fsdp
  mesh = sharding.make_mesh(cfg.mesh)
  built = step.build(cfg, mesh, eos_id=1)
  train_step = built.make(cfg.train.grad_accum_steps)
  state, batch = built.init(), jax.device_put(tokens, built.batch_sh)
  with jax.set_mesh(mesh) if in_mesh else contextlib.nullcontext():
    lowered = train_step.lower(state, batch)
    state, out = train_step(state, batch)
  return jax.device_get(out), jax.device_get(state.params), lowered.as_text()


def test_fused_loss_per_shard_under_an_fsdp_mesh():
  """Loss and gradients of the train step's loss with FSDP-sharded params and a batch split over 8 devices, traced inside
  the mesh: the fused loss runs per shard (shard_map: each device scans its own 2 blocks of 48 tokens, one
  all-reduce of the sums and the lm_head gradient) and equals the unsharded computation."""
  tokens = _doc_tokens(B=8)
  cfg = _tiny_cfg(loss_block_size=48)
  model = Transformer(ModelConfig.from_config(cfg.model), eos_id=1)
  params = jax.jit(model.init)(jax.random.key(0), tokens)["params"]
  grad_fn = jax.value_and_grad(_loss_fn(model), has_aux=True)
  mesh = sharding.make_mesh(dataclasses.make_dataclass("M", [("data", int)])(8))
  param_sh = jax.tree.map(lambda x: NamedSharding(mesh, sharding.leaf_spec(x.shape, 8, True)), params)
  sharded = jax.jit(grad_fn, in_shardings=(param_sh, sharding.batch_sharding(mesh)))
  with jax.set_mesh(mesh):
    assert "manual_computation" in sharded.lower(params, tokens).as_text()
    (total8, nll8), grads8 = sharded(params, tokens)
  (total1, nll1), grads1 = jax.jit(grad_fn)(params, tokens)
  assert float(total8) == pytest.approx(float(total1), rel=1e-5)
  assert float(nll8) == pytest.approx(float(nll1), rel=1e-5)
  for a, b in zip(jax.tree.leaves(grads1), jax.tree.leaves(grads8)):
    assert float(jnp.max(jnp.abs(a - b))) <= 1e-5 * float(jnp.max(jnp.abs(a)))


@pytest.mark.slow
def test_fused_loss_per_shard_under_fsdp_with_accumulation():
  """FSDP over 8 devices with 2 microbatches, traced inside the mesh: the fused loss runs per batch shard
  (shard_map; each device scans its own 2 blocks of 48 tokens, the sums and the lm_head gradient are all-reduced
  once) and the step's loss, gradient norm and updated params equal one device's."""
  tokens = _doc_tokens(B=16)
  cfg = _tiny_cfg(loss_block_size=48)
  # Adam's first update is ~sign(g) wherever |g| << epsilon: a 1e-9 gradient's fp32 summation order (8 shards vs
  # one) would move its parameter by a whole learning rate. epsilon 1e-3 keeps the update linear in such g.
  cfg.optimizer.epsilon = 1e-3
  cfg.train.train_batch_size, cfg.train.grad_accum_steps = 16, 2
  out8, params8, text = _one_step(cfg, 8, True, tokens, in_mesh=True)
  assert "manual_computation" in text, "the fused loss must run per shard under the mesh"
  cfg.train.grad_accum_steps = 1
  out1, params1, _ = _one_step(cfg, 1, False, tokens, in_mesh=False)
  for key in ("loss", "grad_norm"):
    assert float(out8[key]) == pytest.approx(float(out1[key]), rel=1e-5), key
  for a, b in zip(jax.tree.leaves(params1), jax.tree.leaves(params8)):
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_loss_statistics_match_logits():
  x = jax.random.normal(jax.random.key(0), (3, 10, 8))
  head = jax.random.normal(jax.random.key(1), (8, 50))
  t = jax.random.randint(jax.random.key(2), (3, 10), 0, 50)
  ref, blk = loss.reference_stats(x, head, t), loss.token_stats(x, head, t, block=7)
  logits = np.asarray(x @ head, np.float64)
  np.testing.assert_allclose(np.asarray(blk["logz"]), np.log(np.exp(logits).sum(-1)), rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(blk["correct"]), (logits.argmax(-1) == np.asarray(t)).astype(np.float32))
  for key in ref:
    np.testing.assert_allclose(np.asarray(blk[key]), np.asarray(ref[key]), rtol=1e-6, atol=1e-6)


def _step_temp_bytes(cfg) -> int:
  built = step.build(cfg, sharding.make_mesh(dataclasses.make_dataclass("M", [("data", int)])(1)), eos_id=1)
  return built.planner(cfg.train.train_batch_size).info(1)["temp"]


def test_step_memory_is_linear_in_seq_len_with_no_BLV_buffer():
  """Compile only (XLA's buffer assignment): doubling seq_len at most ~doubles temp memory with blockwise attention
  and loss (the reference attention's [L, L] scores grow 4x), and the whole temp is smaller than ONE fp32 [B, L, V]
  logits array."""
  temps = {}
  for impl, block in (("blockwise", 128), ("reference", 0)):
    for L in (512, 1024):
      cfg = _tiny_cfg(attention=impl, loss_block_size=block, seq_len=L, vocab_size=8192, attention_block=128)
      temps[impl, L] = _step_temp_bytes(cfg)
  assert temps["blockwise", 1024] / temps["blockwise", 512] < 2.3
  assert temps["reference", 1024] / temps["reference", 512] > 2.5
  assert temps["blockwise", 1024] < 4 * 1024 * 8192 * 4, "no [B, L, V] fp32 logits buffer may exist"


@pytest.mark.parametrize("platform,impl,marker", [("tpu", "splash", "tpu_custom_call"),
                                                  ("cuda", "pallas_gpu", "__gpu$xla.gpu.triton")])
def test_train_step_exports_for_accelerators(platform, impl, marker):
  """jax.export of the real train step for TPU and CUDA on this CPU machine; the module holds the kernel's custom
  call (Mosaic on TPU; Triton on CUDA, whose call jax.export accepts only when listed in disabled_checks)."""
  cfg = _tiny_cfg(attention=impl, seq_len=256, compute_dtype="bfloat16")
  built = step.build(cfg, sharding.make_mesh(dataclasses.make_dataclass("M", [("data", int)])(1)), eos_id=1)
  checks = [export.DisabledSafetyCheck.custom_call(marker)] if platform == "cuda" else []
  exported = export.export(built.make(1), platforms=[platform], disabled_checks=checks)(
      built.shapes, jax.ShapeDtypeStruct((4, 256), jnp.int32))
  assert exported.platforms == (platform,)
  assert marker in exported.mlir_module()
