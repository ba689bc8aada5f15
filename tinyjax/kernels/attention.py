"""Causal attention with EOS document masking, in four implementations that share one signature and one test.

  attend(q_BLGRK, k_BLGK, v_BLGK, seg_BL, impl) -> out_BLGRK

Query heads come grouped by kv head (Levanter's q_proj Out axis is (kv_heads, q_per_group, head_dim)); position l
attends to m iff m <= l and seg[l] == seg[m]. Scores are scaled by 1/sqrt(K) and softmaxed in fp32.

  reference   the einsum: materialises fp32 scores [B, G, R, L, L] (tests, tiny shapes)
  blockwise   pure-JAX flash attention (online softmax over key blocks, custom VJP that recomputes scores from the
              saved log-sum-exp), blocked over queries and keys so that key blocks entirely in the future of a
              query block are skipped, forward and backward: O(L * block) memory, every backend; what the CPU
              memory figures use
  splash      TPU: Pallas splash attention (CausalMask + SegmentIds; GQA as one MQA kernel per kv head)
  pallas_gpu  GPU: Pallas/Triton flash attention with segment ids (jax.experimental.pallas.ops.gpu.attention);
              that kernel wants as many k/v heads as q heads, so k/v are repeated per group
  auto        splash on TPU (seq_len a multiple of 128), pallas_gpu on GPU; elsewhere blockwise above
              AUTO_REFERENCE_MAX_LEN tokens, else reference
cuDNN (jax.nn.dot_product_attention(implementation="cudnn")) is not offered: it takes sequence lengths, not segment
ids, so it cannot express Levanter's document mask.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

IMPLEMENTATIONS = ("auto", "reference", "blockwise", "splash", "pallas_gpu")
AUTO_REFERENCE_MAX_LEN = 512  # at <= 512 tokens the [L, L] scores are small and the einsum is fastest on CPU
SPLASH_LANES = 128  # splash's key blocks are multiples of the TPU's 128 lanes: shorter windows use the pure-JAX kernels
DATA_AXIS = "data"  # the mesh axis the batch is split over (sharding.DATA)


def resolve(impl: str, platform: str, seq_len: int) -> str:
  """The implementation `impl` stands for on `platform` ("cpu", "gpu"/"cuda"/"rocm", "tpu")."""
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"unknown attention implementation {impl!r}; allowed: {', '.join(IMPLEMENTATIONS)}")
  if impl != "auto":
    return impl
  if platform == "tpu" and seq_len % SPLASH_LANES == 0:
    return "splash"
  if platform in ("gpu", "cuda", "rocm"):
    return "pallas_gpu"
  return "reference" if seq_len <= AUTO_REFERENCE_MAX_LEN else "blockwise"


def attend(q_BLGRK, k_BLGK, v_BLGK, seg_BL, impl: str, block: int = 512, interpret: bool = False):
  if impl == "reference":
    return reference(q_BLGRK, k_BLGK, v_BLGK, seg_BL)
  if impl == "blockwise":
    return blockwise(q_BLGRK, k_BLGK, v_BLGK, seg_BL, _block(q_BLGRK.shape[1], block))
  kernel = {"splash": splash, "pallas_gpu": pallas_gpu}.get(impl)
  if kernel is None:
    raise ValueError(f"attention implementation {impl!r} is not concrete; call resolve() first")
  return _per_shard(functools.partial(kernel, interpret=interpret), q_BLGRK, k_BLGK, v_BLGK, seg_BL)


def _block(seq_len: int, block: int) -> int:
  """The largest divisor of seq_len that is <= block (seq_len is a power of two in every Marin config)."""
  return max(b for b in range(1, min(block, seq_len) + 1) if seq_len % b == 0)


KERNEL_BLOCKS = {"splash": 512, "pallas_gpu": 128}  # the key/query block each Pallas kernel is given (at most)


def causal_fraction(impl: str, seq_len: int, block: int = 512) -> float:
  """Share of the (query block, key block) pairs a causal kernel computes: (n + 1) / 2n of n x n blocks."""
  n = seq_len // _block(seq_len, KERNEL_BLOCKS.get(impl, block))
  return (n + 1) / (2 * n)


def batch_shards() -> int:
  """How many shards the mesh in context (jax.set_mesh) splits the batch into; 1 without one."""
  mesh = jax.sharding.get_abstract_mesh()
  return 1 if mesh.empty or DATA_AXIS not in mesh.axis_names else mesh.shape[DATA_AXIS]


def _per_shard(kernel, *args):
  """Pallas kernels are opaque to GSPMD: run them per batch shard (shard_map) when a mesh splits the batch."""
  if batch_shards() == 1:
    return kernel(*args)
  spec = P(DATA_AXIS)
  return jax.shard_map(kernel, in_specs=(spec,) * 4, out_specs=spec, check_vma=False)(*args)


def _mask(seg_q_BL, seg_k_BM, pos_q_L, pos_k_M):
  """bool[B, 1, 1, L, M]: causal and same document."""
  same_BLM = seg_q_BL[:, :, None] == seg_k_BM[:, None, :]
  causal_LM = pos_q_L[:, None] >= pos_k_M[None, :]
  return (same_BLM & causal_LM[None])[:, None, None]


def reference(q_BLGRK, k_BLGK, v_BLGK, seg_BL):
  K, L = q_BLGRK.shape[-1], q_BLGRK.shape[1]
  scores_BGRLL = jnp.einsum("blgrk,bmgk->bgrlm", q_BLGRK, k_BLGK,
                            preferred_element_type=jnp.float32) / math.sqrt(K)
  pos = jnp.arange(L)
  scores_BGRLL = jnp.where(_mask(seg_BL, seg_BL, pos, pos), scores_BGRLL, jnp.finfo(jnp.float32).min)
  probs_BGRLL = jax.nn.softmax(scores_BGRLL, axis=-1).astype(v_BLGK.dtype)
  return jnp.einsum("bgrlm,bmgk->blgrk", probs_BGRLL, v_BLGK)


def logit_stats(q_BLGRK, k_BLGK, seg_BL) -> dict:
  """Pre-softmax attention logits q.k/sqrt(K) over the allowed (causal, same-document) pairs: per query head
  (h = g*R + r) the max and RMS, and the layer's mean attention entropy in nats. Materialises [B, G, R, L, L]: for
  the dynamics step's few rows only."""
  B, L, G, R, K = q_BLGRK.shape
  s_BGRLL = jnp.einsum("blgrk,bmgk->bgrlm", q_BLGRK, k_BLGK, preferred_element_type=jnp.float32) / math.sqrt(K)
  pos = jnp.arange(L)
  mask = jnp.broadcast_to(_mask(seg_BL, seg_BL, pos, pos), s_BGRLL.shape)
  per_head = lambda x_BGRLL: jnp.moveaxis(x_BGRLL, 0, 2).reshape(G * R, -1)  # [H, B*L*L]
  count_H = per_head(mask).sum(-1)
  logit_max_H = jnp.max(per_head(jnp.where(mask, s_BGRLL, -jnp.inf)), axis=-1)
  logit_rms_H = jnp.sqrt(per_head(jnp.where(mask, s_BGRLL * s_BGRLL, 0.0)).sum(-1) / count_H)
  logp_BGRLL = jax.nn.log_softmax(jnp.where(mask, s_BGRLL, -jnp.inf), axis=-1)
  entropy_BGRL = -jnp.sum(jnp.where(mask, jnp.exp(logp_BGRLL) * logp_BGRLL, 0.0), axis=-1)
  return {"logit_max": logit_max_H, "logit_rms": logit_rms_H, "entropy": jnp.mean(entropy_BGRL)}


# ---- blockwise (flash) attention in pure JAX -------------------------------------------------------------------

def _causal_pairs(n: int):
  """(query block, key block) indices with key <= query, query-major: the only blocks causal attention needs. The
  rest lie entirely in the future of their query block and are never computed (n(n+1)/2 of n^2 blocks: 36 of 64 at
  seq 4096 / block 512)."""
  i_P, j_P = np.tril_indices(n)  # row-major: for each query block i, key blocks 0..i in order
  return jnp.asarray(i_P, jnp.int32), jnp.asarray(j_P, jnp.int32)


def _take(x_BL, index, block: int):
  """Block `index` of axis 1: x[:, index*block : (index+1)*block]."""
  return jax.lax.dynamic_slice_in_dim(x_BL, index * block, block, axis=1)


def _block_probs(qs_BCGRK, k_BCGK, seg_BC, seg_BM, pos_C, pos_M, lse_BGRC=None, m_BGRC=None):
  """Scores of a query block against a key block, masked; exp'ed against lse (backward) or a running max."""
  s_BGRCM = jnp.einsum("bcgrk,bmgk->bgrcm", qs_BCGRK, k_BCGK.astype(jnp.float32))
  mask = _mask(seg_BC, seg_BM, pos_C, pos_M)
  if lse_BGRC is not None:
    return jnp.where(mask, jnp.exp(s_BGRCM - lse_BGRC[..., None]), 0.0)
  m_new_BGRC = jnp.maximum(m_BGRC, jnp.max(jnp.where(mask, s_BGRCM, -jnp.inf), axis=-1))
  return jnp.where(mask, jnp.exp(s_BGRCM - m_new_BGRC[..., None]), 0.0), m_new_BGRC


def _pair_inputs(i, j, block, qs_BLGRK, k_BLGK, v_BLGK, seg_BL):
  """A (query block i, key block j) pair's slices: q, k, v, their segment ids and positions."""
  pos = lambda b: b * block + jnp.arange(block)
  return (_take(qs_BLGRK, i, block), _take(k_BLGK, j, block), _take(v_BLGK, j, block), _take(seg_BL, i, block),
          _take(seg_BL, j, block), pos(i), pos(j))


def _blockwise_fwd(q_BLGRK, k_BLGK, v_BLGK, seg_BL, block):
  """Online softmax over the causal (query block, key block) pairs in one scan; a query block's state (running
  max m, sum l, accumulator) restarts at its key block 0 and is written out at its diagonal block."""
  B, L, G, R, K = q_BLGRK.shape
  qs_BLGRK = q_BLGRK.astype(jnp.float32) / math.sqrt(K)

  def body(carry, ij):
    m_BGRC, l_BGRC, acc_BGRCK, out_BGRLK, lse_BGRL = carry
    i, j = ij
    q_BCGRK, k_BCGK, v_BCGK, seg_q, seg_k, pos_q, pos_k = _pair_inputs(i, j, block, qs_BLGRK, k_BLGK, v_BLGK, seg_BL)
    first = j == 0
    m_BGRC = jnp.where(first, -jnp.inf, m_BGRC)
    p_BGRCM, m_new_BGRC = _block_probs(q_BCGRK, k_BCGK, seg_q, seg_k, pos_q, pos_k, m_BGRC=m_BGRC)
    # Every query sees itself, so m is finite after its own block; before that exp(-inf - -inf) must not be NaN.
    corr_BGRC = jnp.where(jnp.isfinite(m_new_BGRC), jnp.exp(m_BGRC - m_new_BGRC), 0.0)
    acc_BGRCK = jnp.where(first, 0.0, acc_BGRCK) * corr_BGRC[..., None] + jnp.einsum(
        "bgrcm,bmgk->bgrck", p_BGRCM, v_BCGK.astype(jnp.float32))
    l_BGRC = jnp.where(first, 0.0, l_BGRC) * corr_BGRC + p_BGRCM.sum(-1)
    # Written at every pair of query block i; the last write, at its diagonal pair (j == i), is the final one.
    out_BGRLK = jax.lax.dynamic_update_slice_in_dim(out_BGRLK, acc_BGRCK / l_BGRC[..., None], i * block, axis=3)
    lse_BGRL = jax.lax.dynamic_update_slice_in_dim(lse_BGRL, m_new_BGRC + jnp.log(l_BGRC), i * block, axis=3)
    return (m_new_BGRC, l_BGRC, acc_BGRCK, out_BGRLK, lse_BGRL), None

  state = (jnp.full((B, G, R, block), -jnp.inf), jnp.zeros((B, G, R, block)), jnp.zeros((B, G, R, block, K)))
  init = (*state, jnp.zeros((B, G, R, L, K)), jnp.zeros((B, G, R, L)))
  (*_, out_BGRLK, lse_BGRL), _ = jax.lax.scan(body, init, _causal_pairs(L // block))
  out_BLGRK = jnp.moveaxis(out_BGRLK, 3, 1).astype(q_BLGRK.dtype)
  return out_BLGRK, (q_BLGRK, k_BLGK, v_BLGK, seg_BL, out_BLGRK, lse_BGRL)


def _add_block(x_BL, index, block: int, update_BC):
  return jax.lax.dynamic_update_slice_in_dim(x_BL, _take(x_BL, index, block) + update_BC, index * block, axis=1)


def _blockwise_bwd(block, res, dout_BLGRK):
  """Flash backward over the same causal pairs: scores recomputed from the saved log-sum-exp; dq accumulates into
  query block i, dk and dv into key block j (fp32 carries)."""
  q_BLGRK, k_BLGK, v_BLGK, seg_BL, out_BLGRK, lse_BGRL = res
  K = q_BLGRK.shape[-1]
  scale = 1.0 / math.sqrt(K)
  qs_BLGRK = q_BLGRK.astype(jnp.float32) * scale
  do_BLGRK = dout_BLGRK.astype(jnp.float32)
  delta_BGRL = jnp.einsum("blgrk,blgrk->bgrl", do_BLGRK, out_BLGRK.astype(jnp.float32))

  def body(carry, ij):
    dq_BLGRK, dk_BLGK, dv_BLGK = carry
    i, j = ij
    q_BCGRK, k_BCGK, v_BCGK, seg_q, seg_k, pos_q, pos_k = _pair_inputs(i, j, block, qs_BLGRK, k_BLGK, v_BLGK, seg_BL)
    do_BCGRK = _take(do_BLGRK, i, block)
    lse_BGRC, delta_BGRC = (jax.lax.dynamic_slice_in_dim(x, i * block, block, axis=3) for x in (lse_BGRL, delta_BGRL))
    k_BCGK, v_BCGK = k_BCGK.astype(jnp.float32), v_BCGK.astype(jnp.float32)
    p_BGRCM = _block_probs(q_BCGRK, k_BCGK, seg_q, seg_k, pos_q, pos_k, lse_BGRC=lse_BGRC)
    dv_BMGK = jnp.einsum("bgrcm,bcgrk->bmgk", p_BGRCM, do_BCGRK)
    dp_BGRCM = jnp.einsum("bcgrk,bmgk->bgrcm", do_BCGRK, v_BCGK)
    ds_BGRCM = p_BGRCM * (dp_BGRCM - delta_BGRC[..., None])
    dq_BCGRK = jnp.einsum("bgrcm,bmgk->bcgrk", ds_BGRCM, k_BCGK) * scale
    dk_BMGK = jnp.einsum("bgrcm,bcgrk->bmgk", ds_BGRCM, q_BCGRK)
    return (_add_block(dq_BLGRK, i, block, dq_BCGRK), _add_block(dk_BLGK, j, block, dk_BMGK),
            _add_block(dv_BLGK, j, block, dv_BMGK)), None

  zeros = lambda x: jnp.zeros(x.shape, jnp.float32)
  L = q_BLGRK.shape[1]
  (dq_BLGRK, dk_BLGK, dv_BLGK), _ = jax.lax.scan(body, (zeros(q_BLGRK), zeros(k_BLGK), zeros(v_BLGK)),
                                                 _causal_pairs(L // block))
  return (dq_BLGRK.astype(q_BLGRK.dtype), dk_BLGK.astype(k_BLGK.dtype), dv_BLGK.astype(v_BLGK.dtype), None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def blockwise(q_BLGRK, k_BLGK, v_BLGK, seg_BL, block: int):
  return _blockwise_fwd(q_BLGRK, k_BLGK, v_BLGK, seg_BL, block)[0]


blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)


# ---- accelerator kernels (Pallas) ------------------------------------------------------------------------------

def splash(q_BLGRK, k_BLGK, v_BLGK, seg_BL, interpret: bool = False):
  """TPU splash attention: one MQA kernel per kv head keeps GQA grouped (no repeated K/V)."""
  from jax.experimental.pallas.ops.tpu.splash_attention import (
    splash_attention_kernel as sk,  # noqa: PLC0415
    splash_attention_mask as sm,  # noqa: PLC0415
  )
  B, L, G, R, K = q_BLGRK.shape
  block = _block(L, KERNEL_BLOCKS["splash"])
  sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                        block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
  mask = sm.MultiHeadMask([sm.CausalMask((L, L)) for _ in range(R)])
  kernel = sk.make_splash_mqa(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)
  q_BGRLK = jnp.transpose(q_BLGRK / math.sqrt(K), (0, 2, 3, 1, 4)).astype(q_BLGRK.dtype)  # splash does not scale
  k_BGLK, v_BGLK = jnp.transpose(k_BLGK, (0, 2, 1, 3)), jnp.transpose(v_BLGK, (0, 2, 1, 3))

  def one(q_RLK, k_LK, v_LK, seg_L):
    return kernel(q_RLK, k_LK, v_LK, segment_ids=sk.SegmentIds(q=seg_L, kv=seg_L))
  per_group = jax.vmap(one, in_axes=(0, 0, 0, None))
  out_BGRLK = jax.vmap(per_group)(q_BGRLK, k_BGLK, v_BGLK, seg_BL)
  return jnp.transpose(out_BGRLK, (0, 3, 1, 2, 4))


def pallas_gpu(q_BLGRK, k_BLGK, v_BLGK, seg_BL, interpret: bool = False):
  """GPU (Triton) flash attention with segment ids; the kernel indexes k/v by query head, so K/V are repeated."""
  from jax.experimental.pallas.ops.gpu import attention as ga  # noqa: PLC0415
  B, L, G, R, K = q_BLGRK.shape
  block = _block(L, KERNEL_BLOCKS["pallas_gpu"])
  q_BLHK = q_BLGRK.reshape(B, L, G * R, K)
  k_BLHK, v_BLHK = jnp.repeat(k_BLGK, R, axis=2), jnp.repeat(v_BLGK, R, axis=2)
  sizes = ga.BlockSizes(block_q=block, block_k=block, block_q_dkv=block, block_kv_dkv=block, block_q_dq=block,
                        block_kv_dq=block)
  out_BLHK = ga.mha(q_BLHK, k_BLHK, v_BLHK, seg_BL, sm_scale=1.0 / math.sqrt(K), causal=True, block_sizes=sizes,
                    interpret=interpret)
  return out_BLHK.reshape(B, L, G, R, K)


def analytic_bytes(impl: str, B: int, L: int, H: int, K: int, block: int = 512) -> int:
  """Per-layer transient bytes of the score buffers (fp32), for the memory plan."""
  if impl == "reference":
    return 4 * B * H * L * L * 2  # scores and probabilities
  b = min(block, L)  # one (query block, key block) pair's scores/probs, the output and lse, one block's state
  return 4 * B * H * b * b * 2 + 4 * B * H * L * (K + 1) + 4 * B * H * b * (K + 2)

