"""The lm_head and next-token loss over blocks of tokens: no [B, L, V] logits array exists (forward or backward).

Two implementations of the same math (config model.loss_impl), each holding one block's [block, V] logits at a time
(block 2048 x V 128,256 x fp32 = 1.05 GB, instead of 128 x 1024 x 128,256 x 4 bytes = 67 GB unblocked):

  fused      (default) `fused_loss`: per block, logits -> log-partition, NLL and z-loss, and at once the gradients of
             the block's hidden states and its share of the lm_head's (summed in fp32), inside the forward pass. A
             jax.custom_vjp whose backward only scales them by the incoming cotangent, so the lm_head costs the three
             [tokens, D] x [D, V] matmuls Marin credits (the idea of Liger's fused linear cross-entropy).
  blockwise  `token_stats`: a lax.scan whose body is rematerialised (jax.checkpoint), differentiated by JAX: the
             backward pass recomputes every block's logits, four lm_head matmuls instead of three (Levanter's
             blocking). Also the eval statistics' path (no backward there, so no recompute).

Per block the forward ops are those of the unblocked reference (`reference_stats`): the dot in the compute dtype,
then fp32. The fused gradients are formed in fp32, cast to the compute dtype for the two backward matmuls (the
roundings autodiff of the reference makes), and those matmuls accumulate in fp32.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from tinyjax.kernels import attention

IMPLEMENTATIONS = ("auto", "fused", "blockwise", "pallas_tpu", "pallas_gpu")
PALLAS = {"pallas_tpu": "tpu", "pallas_gpu": "gpu"}  # implementation -> pallas_loss backend


def resolve(impl: str, platform: str) -> str:
  """The implementation `impl` stands for on `platform`: auto keeps the logits on chip where a Pallas kernel
  compiles (TPU, GPU) and is the XLA fused loss on a CPU."""
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"unknown loss implementation {impl!r}; allowed: {', '.join(IMPLEMENTATIONS)}")
  if impl != "auto":
    return impl
  return {"tpu": "pallas_tpu", "gpu": "pallas_gpu", "cuda": "pallas_gpu", "rocm": "pallas_gpu"}.get(platform, "fused")
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


def _padded_blocks(block: int, *arrays_N):
  """[n, ...] arrays -> [nb, block, ...] with n padded up to nb * block (zeros)."""
  n = arrays_N[0].shape[0]
  nb = -(-n // block)
  pad = lambda a: jnp.pad(a, ((0, nb * block - n),) + ((0, 0),) * (a.ndim - 1))
  return [pad(a).reshape(nb, block, *a.shape[1:]) for a in arrays_N]


def token_stats(x_BLD, head_DV, targets_BL, block: int):
  """{nll, logz, correct, top5}: float32[B, L] each, from hidden states x and the lm_head [D, V], block tokens at a
  time. Token count B*L is padded up to a multiple of block (padding rows are computed and dropped)."""
  B, L, D = x_BLD.shape
  n = B * L
  if n <= block:  # one block: the plain computation, without the scan and the recompute in the backward pass
    return reference_stats(x_BLD, head_DV, targets_BL)

  @jax.checkpoint
  def body(_, xs):
    x_bD, t_b = xs
    return None, _stats(_logits(x_bD, head_DV), t_b)

  _, out = jax.lax.scan(body, None, _padded_blocks(block, x_BLD.reshape(n, D), targets_BL.reshape(n)))
  return {k: v.reshape(-1)[:n].reshape(B, L) for k, v in out.items()}


# ---- fused: the gradients inside the forward pass ---------------------------------------------------------------

def _block_loss_and_grads(x_bD, head_DV, t_b, w_b, z_weight: float):
  """One block (x and head in the compute dtype): ((Σ w·nll, Σ w·logz²), d/dx, d/dhead) of Σ w·(nll + z·logz²).

  d/dlogits = w·(1 + 2z·logz)·softmax - w·onehot(target), formed in fp32 and cast to the compute dtype for the two
  matmuls (as autodiff of the reference casts the logits' cotangent), which accumulate in fp32."""
  logits_bV = _logits(x_bD, head_DV)
  logz_b = jax.nn.logsumexp(logits_bV, axis=-1)
  target_b = jnp.take_along_axis(logits_bV, t_b[:, None], axis=-1)[:, 0]
  scale_b = w_b * (1.0 + 2.0 * z_weight * logz_b)
  # One elementwise pass from the fp32 logits to the compute-dtype gradient (a one-hot compare, not a scatter, so
  # that XLA fuses it and no second fp32 [block, V] buffer exists).
  onehot_bV = jnp.arange(logits_bV.shape[1])[None, :] == t_b[:, None]
  g_bV = (scale_b[:, None] * jnp.exp(logits_bV - logz_b[:, None]) - jnp.where(onehot_bV, w_b[:, None], 0.0))
  g_bV = g_bV.astype(head_DV.dtype)
  dx_bD = jnp.einsum("bv,dv->bd", g_bV, head_DV, preferred_element_type=jnp.float32)
  dhead_DV = jnp.einsum("bd,bv->dv", x_bD, g_bV, preferred_element_type=jnp.float32)
  return (jnp.sum(w_b * (logz_b - target_b)), jnp.sum(w_b * logz_b * logz_b)), dx_bD, dhead_DV


def _local_loss_and_grads(x_BLD, head_DV, targets_BL, weights_BL, z_weight: float, block: int, dtype: str):
  """((Σ w·nll, Σ w·logz²), dx in x's dtype, dhead in fp32) over these tokens, `block` at a time: a lax.scan whose
  carry sums the lm_head gradient and whose output is the rows of dx."""
  B, L, D = x_BLD.shape
  n = B * L
  x_ND, head_c = x_BLD.reshape(n, D).astype(dtype), head_DV.astype(dtype)
  t_N, w_N = targets_BL.reshape(n), weights_BL.reshape(n).astype(jnp.float32)
  if n <= block:  # one block: no scan
    sums, dx_ND, dhead_DV = _block_loss_and_grads(x_ND, head_c, t_N, w_N, z_weight)
    return sums, dx_ND.astype(x_BLD.dtype).reshape(B, L, D), dhead_DV

  def body(carry, xs):
    (nll, z), dhead_DV = carry
    (nll_b, z_b), dx_bD, dhead_b = _block_loss_and_grads(xs[0], head_c, xs[1], xs[2], z_weight)
    return ((nll + nll_b, z + z_b), dhead_DV + dhead_b), dx_bD.astype(x_BLD.dtype)

  zero = jnp.zeros((), jnp.float32)
  init = ((zero, zero), jnp.zeros(head_DV.shape, jnp.float32))
  (sums, dhead_DV), dx_nbD = jax.lax.scan(body, init, _padded_blocks(block, x_ND, t_N, w_N))
  return sums, dx_nbD.reshape(-1, D)[:n].reshape(B, L, D), dhead_DV


def _pallas_loss_and_grads(x_BLD, head_DV, targets_BL, weights_BL, z_weight: float, dtype: str, backend: str,
                           interpret: bool):
  """_local_loss_and_grads by the Pallas kernels (kernels/pallas_loss.py): no block's logits leave the chip."""
  from tinyjax.kernels import pallas_loss  # noqa: PLC0415 - Pallas is imported only where it runs
  B, L, D = x_BLD.shape
  sums, dx_ND, dhead_DV = pallas_loss.loss_and_grads(
      x_BLD.reshape(B * L, D).astype(dtype), head_DV.astype(dtype), targets_BL.reshape(B * L),
      weights_BL.reshape(B * L), z_weight, backend=backend, interpret=interpret)
  return sums, dx_ND.astype(x_BLD.dtype).reshape(B, L, D), dhead_DV


def _loss_and_grads(x_BLD, head_DV, targets_BL, weights_BL, z_weight: float, block: int, dtype: str,
                    impl: str = "fused", interpret: bool = False):
  """Per batch shard when a mesh splits the batch (shard_map: every device blocks its own tokens, and the sums and
  the lm_head gradient are all-reduced once, after its scan), else on the whole arrays."""
  if impl in PALLAS:
    local = functools.partial(_pallas_loss_and_grads, z_weight=z_weight, dtype=dtype, backend=PALLAS[impl],
                              interpret=interpret)
  else:
    local = functools.partial(_local_loss_and_grads, z_weight=z_weight, block=block, dtype=dtype)
  if attention.batch_shards() == 1:
    return local(x_BLD, head_DV, targets_BL, weights_BL)

  def shard(*args):
    sums, dx_BLD, dhead_DV = local(*args)
    sums, dhead_DV = jax.lax.psum((sums, dhead_DV), attention.DATA_AXIS)
    return sums, dx_BLD, dhead_DV
  rows = P(attention.DATA_AXIS)
  return jax.shard_map(shard, in_specs=(rows, P(), rows, rows), out_specs=((P(), P()), rows, P()),
                       check_vma=False)(x_BLD, head_DV, targets_BL, weights_BL)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8))
def _fused(x_BLD, head_DV, targets_BL, weights_BL, z_weight: float, block: int, dtype: str, impl: str,
           interpret: bool):
  return _fused_fwd(x_BLD, head_DV, targets_BL, weights_BL, z_weight, block, dtype, impl, interpret)[0]


def _fused_fwd(x_BLD, head_DV, targets_BL, weights_BL, z_weight, block, dtype, impl, interpret):
  (nll, z), dx_BLD, dhead_DV = _loss_and_grads(x_BLD, head_DV, targets_BL, weights_BL, z_weight, block, dtype,
                                               impl, interpret)
  return (nll + z_weight * z, nll), (dx_BLD, dhead_DV.astype(head_DV.dtype))


def _fused_bwd(z_weight, block, dtype, impl, interpret, res, cotangents):
  dx_BLD, dhead_DV = res
  g = cotangents[0]  # the second output is a statistic: fused_loss stops its gradient, so its cotangent is 0
  return (g * dx_BLD).astype(dx_BLD.dtype), (g * dhead_DV).astype(dhead_DV.dtype), None, None


_fused.defvjp(_fused_fwd, _fused_bwd)


def fused_loss(x_BLD, head_DV, targets_BL, weights_BL, z_loss_weight: float, block: int, dtype: str,
               impl: str = "fused", interpret: bool = False):
  """(Σ w·(nll + z_loss_weight·logz²), Σ w·nll) over the tokens, differentiable in x (gradient in its dtype) and
  the lm_head [D, V] (gradient in its dtype, summed in fp32); the matmuls run in `dtype` (the compute dtype). The
  weights (e.g. the loss mask) and the second output are statistics: their gradients are stopped. impl "fused":
  XLA, `block` tokens at a time; "pallas_tpu" / "pallas_gpu": the Pallas kernels (`interpret`: on any platform)."""
  if impl not in ("fused", *PALLAS):
    raise ValueError(f"fused_loss computes impl 'fused' or {', '.join(PALLAS)}, not {impl!r}")
  total, nll = _fused(x_BLD, head_DV, targets_BL, jax.lax.stop_gradient(weights_BL), float(z_loss_weight),
                      int(block), jnp.dtype(dtype).name, impl, bool(interpret))
  return total, jax.lax.stop_gradient(nll)


def analytic_bytes(tokens: int, vocab: int, block: int) -> int:
  """Transient bytes of the loss: one block's fp32 logits, their softmax/gradient, and a compute-dtype copy."""
  return min(block, tokens) * vocab * (4 + 4 + 2)
