"""Causal attention with EOS document masking, in four implementations that share one signature and one test.

  attend(q_BLGRK, k_BLGK, v_BLGK, seg_BL, impl) -> out_BLGRK

Query heads come grouped by kv head (Levanter's q_proj Out axis is (kv_heads, q_per_group, head_dim)); position l
attends to m iff m <= l and seg[l] == seg[m]. Scores are scaled by 1/sqrt(K) and softmaxed in fp32.

  reference   the einsum: materialises fp32 scores [B, G, R, L, L] (tests, tiny shapes)
  blockwise   pure-JAX flash attention (online softmax over key blocks, custom VJP that recomputes scores from the
              saved log-sum-exp): O(L * block) memory, every backend; what the CPU memory figures use
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


def _per_shard(kernel, *args):
  """Pallas kernels are opaque to GSPMD: run them per batch shard (shard_map) when a mesh splits the batch."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or DATA_AXIS not in mesh.axis_names or mesh.shape[DATA_AXIS] == 1:
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

def _kv_blocks(k_BLGK, v_BLGK, seg_BL, block: int):
  """Key/value blocks as scan inputs: [N, B, block, ...] plus each block's positions [N, block]."""
  B, L = seg_BL.shape
  n = L // block
  split = lambda x: jnp.moveaxis(x.reshape(B, n, block, *x.shape[2:]), 1, 0)
  return split(k_BLGK), split(v_BLGK), split(seg_BL), jnp.arange(L).reshape(n, block)


def _block_probs(qs_BLGRK, k_BMGK, seg_BL, seg_BM, pos_M, lse_BGRL=None, m_BGRL=None):
  """Scores of all queries against one key block, masked; exp'ed against lse (backward) or a running max."""
  s_BGRLM = jnp.einsum("blgrk,bmgk->bgrlm", qs_BLGRK, k_BMGK.astype(jnp.float32))
  mask = _mask(seg_BL, seg_BM, jnp.arange(seg_BL.shape[1]), pos_M)
  if lse_BGRL is not None:
    return jnp.where(mask, jnp.exp(s_BGRLM - lse_BGRL[..., None]), 0.0)
  m_new_BGRL = jnp.maximum(m_BGRL, jnp.max(jnp.where(mask, s_BGRLM, -jnp.inf), axis=-1))
  return jnp.where(mask, jnp.exp(s_BGRLM - m_new_BGRL[..., None]), 0.0), m_new_BGRL


def _blockwise_fwd(q_BLGRK, k_BLGK, v_BLGK, seg_BL, block):
  B, L, G, R, K = q_BLGRK.shape
  qs_BLGRK = q_BLGRK.astype(jnp.float32) / math.sqrt(K)

  def body(carry, xs):
    m_BGRL, l_BGRL, acc_BGRLK = carry
    k_BMGK, v_BMGK, seg_BM, pos_M = xs
    p_BGRLM, m_new_BGRL = _block_probs(qs_BLGRK, k_BMGK, seg_BL, seg_BM, pos_M, m_BGRL=m_BGRL)
    # Every query sees itself, so m is finite after its own block; before that exp(-inf - -inf) must not be NaN.
    corr_BGRL = jnp.where(jnp.isfinite(m_new_BGRL), jnp.exp(m_BGRL - m_new_BGRL), 0.0)
    acc_BGRLK = acc_BGRLK * corr_BGRL[..., None] + jnp.einsum("bgrlm,bmgk->bgrlk", p_BGRLM,
                                                             v_BMGK.astype(jnp.float32))
    return (m_new_BGRL, l_BGRL * corr_BGRL + p_BGRLM.sum(-1), acc_BGRLK), None

  init = (jnp.full((B, G, R, L), -jnp.inf), jnp.zeros((B, G, R, L)), jnp.zeros((B, G, R, L, K)))
  (m_BGRL, l_BGRL, acc_BGRLK), _ = jax.lax.scan(body, init, _kv_blocks(k_BLGK, v_BLGK, seg_BL, block))
  out_BLGRK = jnp.moveaxis(acc_BGRLK / l_BGRL[..., None], 3, 1).astype(q_BLGRK.dtype)
  lse_BGRL = m_BGRL + jnp.log(l_BGRL)
  return out_BLGRK, (q_BLGRK, k_BLGK, v_BLGK, seg_BL, out_BLGRK, lse_BGRL)


def _blockwise_bwd(block, res, dout_BLGRK):
  q_BLGRK, k_BLGK, v_BLGK, seg_BL, out_BLGRK, lse_BGRL = res
  K = q_BLGRK.shape[-1]
  scale = 1.0 / math.sqrt(K)
  qs_BLGRK = q_BLGRK.astype(jnp.float32) * scale
  do_BLGRK = dout_BLGRK.astype(jnp.float32)
  delta_BGRL = jnp.einsum("blgrk,blgrk->bgrl", do_BLGRK, out_BLGRK.astype(jnp.float32))

  def body(dq_BLGRK, xs):
    k_BMGK, v_BMGK, seg_BM, pos_M = xs
    p_BGRLM = _block_probs(qs_BLGRK, k_BMGK, seg_BL, seg_BM, pos_M, lse_BGRL=lse_BGRL)
    dv_BMGK = jnp.einsum("bgrlm,blgrk->bmgk", p_BGRLM, do_BLGRK)
    dp_BGRLM = jnp.einsum("blgrk,bmgk->bgrlm", do_BLGRK, v_BMGK.astype(jnp.float32))
    ds_BGRLM = p_BGRLM * (dp_BGRLM - delta_BGRL[..., None])
    dq_BLGRK = dq_BLGRK + jnp.einsum("bgrlm,bmgk->blgrk", ds_BGRLM, k_BMGK.astype(jnp.float32)) * scale
    dk_BMGK = jnp.einsum("bgrlm,blgrk->bmgk", ds_BGRLM, qs_BLGRK)
    return dq_BLGRK, (dk_BMGK, dv_BMGK)

  xs = _kv_blocks(k_BLGK, v_BLGK, seg_BL, block)
  dq_BLGRK, (dk_NBMGK, dv_NBMGK) = jax.lax.scan(body, jnp.zeros(q_BLGRK.shape, jnp.float32), xs)
  unblock = lambda x: jnp.moveaxis(x, 0, 1).reshape(k_BLGK.shape)
  return (dq_BLGRK.astype(q_BLGRK.dtype), unblock(dk_NBMGK).astype(k_BLGK.dtype),
          unblock(dv_NBMGK).astype(v_BLGK.dtype), None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def blockwise(q_BLGRK, k_BLGK, v_BLGK, seg_BL, block: int):
  return _blockwise_fwd(q_BLGRK, k_BLGK, v_BLGK, seg_BL, block)[0]


blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)


# ---- accelerator kernels (Pallas) ------------------------------------------------------------------------------

def splash(q_BLGRK, k_BLGK, v_BLGK, seg_BL, interpret: bool = False):
  """TPU splash attention: one MQA kernel per kv head keeps GQA grouped (no repeated K/V)."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk  # noqa: PLC0415
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm  # noqa: PLC0415
  B, L, G, R, K = q_BLGRK.shape
  block = _block(L, 512)
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
  block = _block(L, 128)
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
  return 4 * B * H * L * min(block, L) * 2 + 4 * B * H * L * (K + 2)  # one block's scores/probs + the accumulator

