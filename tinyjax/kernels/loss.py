"""Next-token statistics over blocks of tokens, so that no [B, L, V] logits array exists (forward or backward).

Levanter calls this cross-entropy blocking. The lm_head projection, log-partition and target logit are computed for
`block` tokens at a time inside a `lax.scan` whose body is rematerialised (`jax.checkpoint`): the backward pass
recomputes one block's logits from its saved hidden states, so peak memory holds one block's [block, V] logits
(block 2048 x V 128,256 x fp32 = 1.05 GB) instead of all B*L of them (128 x 1024 x 128,256 x 4 bytes = 67 GB).
Per block the ops are those of the unblocked reference (`reference_stats`): the dot in the compute dtype, then fp32.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

TOP_K = 5  # eval top-k accuracy


def _stats(logits_NV, targets_N):
  """fp32 logits -> per-token NLL, log-partition, argmax hit and top-k hit (ties count as hits)."""
  logz_N = jax.nn.logsumexp(logits_NV, axis=-1)
  target_N = jnp.take_along_axis(logits_NV, targets_N[:, None], axis=-1)[:, 0]
  above_N = jnp.sum(logits_NV > target_N[:, None], axis=-1)  # tokens ranked strictly above the target
  return {"nll": logz_N - target_N, "logz": logz_N, "correct": (above_N == 0).astype(jnp.float32),
          "top5": (above_N < TOP_K).astype(jnp.float32)}


def _logits(x_ND, head_DV):
  return jnp.dot(x_ND, head_DV.astype(x_ND.dtype)).astype(jnp.float32)


def reference_stats(x_BLD, head_DV, targets_BL):
  """The unblocked computation (materialises [B, L, V]): tests and the memory comparison."""
  B, L, D = x_BLD.shape
  out = _stats(_logits(x_BLD.reshape(B * L, D), head_DV), targets_BL.reshape(B * L))
  return {k: v.reshape(B, L) for k, v in out.items()}


def token_stats(x_BLD, head_DV, targets_BL, block: int):
  """{nll, logz, correct, top5}: float32[B, L] each, from hidden states x and the lm_head [D, V], block tokens at a
  time. Token count B*L is padded up to a multiple of block (padding rows are computed and dropped)."""
  B, L, D = x_BLD.shape
  n = B * L
  if n <= block:  # one block: the plain computation, without the scan and the recompute in the backward pass
    return reference_stats(x_BLD, head_DV, targets_BL)
  nb = -(-n // block)
  x_ND = jnp.pad(x_BLD.reshape(n, D), ((0, nb * block - n), (0, 0)))
  t_N = jnp.pad(targets_BL.reshape(n), (0, nb * block - n))

  @jax.checkpoint
  def body(_, xs):
    x_bD, t_b = xs
    return None, _stats(_logits(x_bD, head_DV), t_b)

  _, out = jax.lax.scan(body, None, (x_ND.reshape(nb, block, D), t_N.reshape(nb, block)))
  return {k: v.reshape(nb * block)[:n].reshape(B, L) for k, v in out.items()}


def analytic_bytes(tokens: int, vocab: int, block: int) -> int:
  """Transient bytes of the loss: one block's fp32 logits, their softmax/gradient, and a compute-dtype copy."""
  return min(block, tokens) * vocab * (4 + 4 + 2)
