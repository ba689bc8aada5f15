"""Every attention implementation and the blockwise loss equal their references (forward and gradients), memory
grows linearly in seq_len with no [B, L, V] buffer, and the train step exports for TPU and CUDA with its kernels."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax.sharding import NamedSharding, PartitionSpec as P

from tinyjax import config, memory, optim, sharding, train
from tinyjax.kernels import attention, loss
from tinyjax.model import ModelConfig, Transformer


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
  cfg.train.train_batch_size = 4
  return cfg


def test_blockwise_loss_equals_reference_in_fp32():
  """Loss, z-loss and every gradient of the real loss function: blockwise (block 48, not dividing B*L) vs the
  unblocked reference, within 1e-5 relative."""
  tokens = jax.random.randint(jax.random.key(3), (4, 64), 0, 384)
  results = []
  for block in (0, 48):
    cfg = _tiny_cfg(loss_block_size=block, attention="reference")
    model = Transformer(ModelConfig.from_config(cfg.model), eos_id=1)
    params = model.init(jax.random.key(0), tokens)["params"]
    results.append(jax.value_and_grad(train.loss_fn(model, 1e-3), has_aux=True)(params, tokens))
  (total0, nll0), g0 = results[0]
  (total1, nll1), g1 = results[1]
  assert float(total1) == pytest.approx(float(total0), rel=1e-5)
  assert float(nll1) == pytest.approx(float(nll0), rel=1e-5)
  assert float(total0 - nll0) > 0, "the z-loss term is part of the comparison"
  for path, a, b in zip(jax.tree_util.tree_leaves_with_path(g0), jax.tree.leaves(g0), jax.tree.leaves(g1)):
    scale = float(jnp.max(jnp.abs(a)))
    assert float(jnp.max(jnp.abs(a - b))) <= 1e-5 * scale + 1e-9, f"gradient of {path[0]}"


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
  model = Transformer(ModelConfig.from_config(cfg.model), eos_id=1)
  tx = optim.make(cfg, 10)
  shapes = jax.eval_shape(lambda: train.init_state(model, tx, 0))
  mesh = sharding.make_mesh(dataclasses.make_dataclass("M", [("data", int)])(1))
  state_sh, batch_sh = sharding.state_shardings(shapes, mesh, False), sharding.batch_sharding(mesh)
  step = train.make_train_step(model, tx, cfg, 10, state_sh, batch_sh)
  abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, state_sh)
  batch = memory.abstract_batch(cfg.train.train_batch_size, cfg.model.seq_len, batch_sh)
  return memory.analysis(step.lower(abstract, batch).compile())["temp"]


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
  model = Transformer(ModelConfig.from_config(cfg.model), eos_id=1)
  tx = optim.make(cfg, 10)
  shapes = jax.eval_shape(lambda: train.init_state(model, tx, 0))
  mesh = sharding.make_mesh(dataclasses.make_dataclass("M", [("data", int)])(1))
  step = train.make_train_step(model, tx, cfg, 10, sharding.state_shardings(shapes, mesh, False),
                               sharding.batch_sharding(mesh))
  checks = [export.DisabledSafetyCheck.custom_call(marker)] if platform == "cuda" else []
  exported = export.export(step, platforms=[platform], disabled_checks=checks)(
      shapes, jax.ShapeDtypeStruct((4, 256), jnp.int32))
  assert exported.platforms == (platform,)
  assert marker in exported.mlir_module()
