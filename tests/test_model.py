"""The Llama matches Levanter's structure: shapes, causality, document masking, RoPE, init scales, dtypes."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tinyjax import flops
from tinyjax.model import ModelConfig, Transformer, rope, segment_ids

EOS = 1
SMALL = ModelConfig(hidden_dim=32, intermediate_dim=64, num_layers=2, num_heads=4, num_kv_heads=2, seq_len=16,
                    vocab_size=97, compute_dtype="float32")


def _init(cfg, seed=0):
  model = Transformer(cfg, eos_id=EOS)
  params = model.init(jax.random.key(seed), jnp.zeros((1, cfg.seq_len), jnp.int32))["params"]
  return model, params


def _tokens(seed, shape, vocab=97):
  return jax.random.randint(jax.random.key(seed), shape, 2, vocab)  # ids >= 2: no accidental EOS


@pytest.mark.slow
def test_logits_shape_dtype_finite():
  model, params = _init(dataclasses.replace(SMALL, compute_dtype="bfloat16"))
  logits = model.apply({"params": params}, _tokens(1, (3, 16)))
  assert logits.shape == (3, 16, 97) and logits.dtype == jnp.float32, "logits must be [B, L, V] in fp32 (loss dtype)"
  assert bool(jnp.isfinite(logits).all())
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params)), "master params must stay fp32 (p=f32)"


@pytest.mark.slow
def test_causal_future_tokens_do_not_change_past_logits():
  model, params = _init(SMALL)
  a = _tokens(2, (1, 16))
  b = a.at[0, 10:].set((a[0, 10:] + 5) % 95 + 2)
  la, lb = model.apply({"params": params}, a), model.apply({"params": params}, b)
  np.testing.assert_allclose(la[0, :10], lb[0, :10], atol=1e-6, err_msg="position t saw a token after t")
  assert not np.allclose(la[0, 10:], lb[0, 10:]), "changed tokens should change their own logits"


def test_attention_blocked_across_documents():
  """Tokens after an EOS must not see the previous document (Levanter segment ids from EOS)."""
  model, params = _init(SMALL)
  a = _tokens(3, (1, 16)).at[0, 5].set(EOS)
  b = a.at[0, :5].set((a[0, :5] + 7) % 95 + 2)  # rewrite document 1 only (same length, same EOS position)
  la, lb = model.apply({"params": params}, a), model.apply({"params": params}, b)
  np.testing.assert_allclose(la[0, 6:], lb[0, 6:], atol=1e-6, err_msg="document 2 attended to document 1")
  # The EOS itself belongs to document 1 (it ends it), so its logits do change.
  assert not np.allclose(la[0, 5], lb[0, 5])


def test_segment_ids_follow_levanter():
  tokens = jnp.array([[5, 1, 7, 8, 1, 1, 9]])
  np.testing.assert_array_equal(segment_ids(tokens, 1), [[0, 0, 1, 1, 1, 2, 3]])


def test_rope_is_relative():
  """q·k after RoPE depends only on the position difference (rotate-half RoPE, theta 10000)."""
  q = jax.random.normal(jax.random.key(0), (1, 1, 1, 8))
  k = jax.random.normal(jax.random.key(1), (1, 1, 1, 8))
  L = 12
  qs, ks = rope(jnp.broadcast_to(q, (1, L, 1, 8)), 1e4), rope(jnp.broadcast_to(k, (1, L, 1, 8)), 1e4)
  dots = jnp.einsum("blhk,bmhk->lm", qs, ks)
  np.testing.assert_allclose(dots[3, 1], dots[9, 7], rtol=1e-5)
  np.testing.assert_allclose(qs[0, 0], q[0, 0], err_msg="position 0 must be the identity")
  # Hand value at position 1 for the first pair (x0, x4): rotate_half pairs dim i with i + K/2.
  x = np.asarray(q[0, 0, 0])
  expect0 = x[0] * np.cos(1.0) - x[4] * np.sin(1.0)
  np.testing.assert_allclose(qs[0, 1, 0, 0], expect0, rtol=1e-5)


@pytest.mark.parametrize("tied,qk_norm,kv", [(False, False, 2), (True, False, 4), (False, True, 1)])
def test_param_count_equals_tree(tied, qk_norm, kv):
  cfg = dataclasses.replace(SMALL, tie_word_embeddings=tied, use_qk_norm=qk_norm, num_kv_heads=kv)
  shapes = jax.eval_shape(lambda: _init(cfg)[1])
  actual = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
  assert flops.param_counts(cfg)["model_size"] == actual, "Marin's formula disagrees with the parameter tree"


@pytest.mark.slow
def test_init_scales_match_levanter():
  cfg = ModelConfig(hidden_dim=64, intermediate_dim=256, num_layers=1, num_heads=2, num_kv_heads=2, seq_len=8,
                    vocab_size=2048)
  _, p = _init(cfg)
  trunc_std = 0.9866  # std of a standard normal truncated to [-3, 3]
  emb, head = p["embed_tokens"]["embedding"], p["lm_head"]["kernel"]
  assert abs(float(emb.std()) - trunc_std / 64) < 0.02 / 64, "embedding init must be truncnormal * 1/hidden_dim"
  assert float(jnp.abs(emb).max()) <= 3.0 / 64 + 1e-7, "truncation at +-3 sigma"
  # Levanter passes the same key to embedding and lm_head: head (D, V) = (embedding * sqrt(D)).T exactly.
  np.testing.assert_allclose(head, emb.T * 8.0, rtol=1e-6)
  up = p["layers_0"]["mlp"]["up_proj"]["kernel"]
  assert abs(float(up.std()) - trunc_std / 8.0) < 0.01, "Linear init must be truncnormal * 1/sqrt(fan_in)"
  down = p["layers_0"]["mlp"]["down_proj"]["kernel"]
  assert abs(float(down.std()) - trunc_std / 16.0) < 0.01, "down_proj fan_in is intermediate_dim"
  np.testing.assert_array_equal(p["norm"]["scale"], np.ones(64))


@pytest.mark.slow
def test_remat_does_not_change_outputs():
  model, params = _init(SMALL)
  remat_model = Transformer(dataclasses.replace(SMALL, remat="block"), eos_id=EOS)
  t = _tokens(4, (2, 16))
  loss = lambda m: jax.grad(lambda p: m.apply({"params": p}, t).sum())(params)
  for a, b in zip(jax.tree.leaves(loss(model)), jax.tree.leaves(loss(remat_model))):
    # Recomputation reorders fp32 sums, so equality is up to rounding relative to the gradient's scale.
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(jnp.abs(a).max()))
