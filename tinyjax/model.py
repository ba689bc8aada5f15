"""A Flax (Linen) Llama identical to Levanter's LlamaLMHeadModel, plus its next-token loss.

Conventions: shape suffixes name the dimensions of every array.
  B batch · L sequence length · D hidden_dim · H query heads · G kv heads · R = H/G queries per kv head
  K head_dim · F intermediate_dim · V vocab_size
Kernels are Flax-style (in, out); Levanter stores (out, in), which only matters for Muon (see optim.py).
Sources: Levanter (github.com/stanford-crfm/levanter @ 9263f81e; lib/levanter in github.com/marin-community/marin)
src/levanter/models/llama.py (architecture), lm_model.py (loss, EOS document masking); Haliax src/haliax/nn/linear.py,
embedding.py (init).
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from tinyjax.kernels import attention, loss

# The name scope of the lm_head and loss in compiled programs' op metadata (hardware/roofline.py's parts; Flax's
# module names name the rest: self_attn, mlp, q_proj, ..., the norms).
LOSS_SCOPE = "lm_head_loss"


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  hidden_dim: int
  intermediate_dim: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  seq_len: int
  vocab_size: int
  tie_word_embeddings: bool = False
  use_qk_norm: bool = False
  layer_norm_epsilon: float = 1e-5
  rope_theta: float = 10000.0
  param_dtype: str = "float32"
  compute_dtype: str = "bfloat16"
  remat: str = "none"
  attention: str = "auto"  # kernels/attention.py IMPLEMENTATIONS; resolved per platform at trace time
  attention_block: int = 512  # key block of the blockwise attention
  loss_block_size: int = 2048  # tokens per lm_head/loss block (kernels/loss.py); 0 = unblocked reference
  loss_impl: str = "auto"  # kernels/loss.py IMPLEMENTATIONS: the training loss's lm_head + loss (same math)
  kernel_interpret: bool = False  # Pallas loss kernels in interpret mode (runs anywhere; slow)

  @classmethod
  def from_config(cls, model_cfg) -> "ModelConfig":
    return cls(**{f.name: model_cfg[f.name] for f in dataclasses.fields(cls)})

  @property
  def head_dim(self) -> int:
    return self.hidden_dim // self.num_heads

  def attention_impl(self, platform: str | None = None) -> str:
    """The concrete attention implementation on `platform` (default: JAX's default backend)."""
    return attention.resolve(self.attention, platform or jax.default_backend(), self.seq_len)

  def loss_kernel(self, platform: str | None = None) -> str:
    """The concrete training-loss implementation on `platform` (default: JAX's default backend)."""
    return loss.resolve(self.loss_impl, platform or jax.default_backend())

  def for_platform(self, platform: str) -> "ModelConfig":
    """This model with `auto` attention and loss resolved for `platform`: a step compiled for a TPU or GPU target
    from a CPU process must trace the target's kernels, not the CPU's."""
    return dataclasses.replace(self, attention=self.attention_impl(platform), loss_impl=self.loss_kernel(platform))


def _truncated_normal(scale: float):
  """Haliax init: truncated_normal(-3, 3) * scale, NOT re-normalised to unit std (unlike flax's initializer)."""
  def init(key, shape, dtype=jnp.float32):
    return jax.random.truncated_normal(key, -3.0, 3.0, shape, dtype) * scale
  return init


def _dense(features: int, fan_in: int, cfg: ModelConfig, name: str) -> nn.Dense:
  # Haliax Linear: truncated normal * 1/sqrt(fan_in), no bias.
  return nn.Dense(features, use_bias=False, kernel_init=_truncated_normal(fan_in ** -0.5),
                  dtype=cfg.compute_dtype, param_dtype=cfg.param_dtype, name=name)


class RMSNorm(nn.Module):
  """Levanter/Haliax RmsNorm: statistics in fp32, weight applied in the compute dtype."""
  eps: float
  dtype: str
  param_dtype: str

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
    return rms_norm(x, scale, self.eps, self.dtype)


def rms_norm(x, scale, eps: float, dtype):
  """The RMSNorm computation (also used by the KV-cache decoder, which works on the raw parameter tree)."""
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return y.astype(dtype) * scale.astype(dtype)


def rope(x_BLNK, theta: float, positions_BL=None):
  """HF/Levanter rotate-half RoPE: inv_freq = theta^(-arange(0,K,2)/K), tables concat(freqs, freqs).

  positions_BL defaults to 0..L-1 (training windows); a decoder passes the absolute positions of new tokens.
  """
  K, L = x_BLNK.shape[-1], x_BLNK.shape[1]
  inv_freq = 1.0 / theta ** (jnp.arange(0, K, 2, dtype=jnp.float32) / K)
  pos_BL = jnp.arange(L, dtype=jnp.float32)[None] if positions_BL is None else positions_BL.astype(jnp.float32)
  freqs_BLK = jnp.concatenate([pos_BL[..., None] * inv_freq] * 2, axis=-1)
  cos, sin = jnp.cos(freqs_BLK)[:, :, None, :], jnp.sin(freqs_BLK)[:, :, None, :]
  x = x_BLNK.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  return (x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin).astype(x_BLNK.dtype)


def segment_ids(tokens_BL, eos_id: int):
  """Levanter LmExample.causal: the token after an EOS starts a new document (position 0 is document 0)."""
  starts_BL = jnp.pad(tokens_BL[:, :-1] == eos_id, ((0, 0), (1, 0)))
  return jnp.cumsum(starts_BL.astype(jnp.int32), axis=1)


class Attention(nn.Module):
  cfg: ModelConfig
  dynamics: bool = False  # also sow pre-softmax logit statistics (dynamics.py; a small sub-batch only)

  @nn.compact
  def __call__(self, x_BLD, seg_BL):
    c = self.cfg
    B, L, D = x_BLD.shape
    H, G, K = c.num_heads, c.num_kv_heads, c.head_dim
    q_BLHK = _dense(H * K, D, c, "q_proj")(x_BLD).reshape(B, L, H, K)
    k_BLGK = _dense(G * K, D, c, "k_proj")(x_BLD).reshape(B, L, G, K)
    v_BLGK = _dense(G * K, D, c, "v_proj")(x_BLD).reshape(B, L, G, K)
    if c.use_qk_norm:
      q_BLHK = RMSNorm(c.layer_norm_epsilon, c.compute_dtype, c.param_dtype, name="q_norm")(q_BLHK)
      k_BLGK = RMSNorm(c.layer_norm_epsilon, c.compute_dtype, c.param_dtype, name="k_norm")(k_BLGK)
    q_BLHK, k_BLGK = rope(q_BLHK, c.rope_theta), rope(k_BLGK, c.rope_theta)
    # Levanter's q_proj Out axis is (kv_heads, q_per_group, head_dim): query heads are grouped by kv head.
    q_BLGRK = q_BLHK.reshape(B, L, G, H // G, K)
    if self.dynamics:
      for name, value in attention.logit_stats(q_BLGRK, k_BLGK, seg_BL).items():
        self.sow("intermediates", name, value)
    out_BLGRK = attention.attend(q_BLGRK, k_BLGK, v_BLGK, seg_BL, c.attention_impl(), c.attention_block)
    return _dense(D, H * K, c, "o_proj")(out_BLGRK.reshape(B, L, H * K))


class MLP(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BLD):
    c = self.cfg
    D, F = c.hidden_dim, c.intermediate_dim
    h_BLF = nn.silu(_dense(F, D, c, "gate_proj")(x_BLD)) * _dense(F, D, c, "up_proj")(x_BLD)
    return _dense(D, F, c, "down_proj")(h_BLF)


class Block(nn.Module):
  """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""
  cfg: ModelConfig
  dynamics: bool = False

  @nn.compact
  def __call__(self, x_BLD, seg_BL):
    c = self.cfg
    norm = lambda name: RMSNorm(c.layer_norm_epsilon, c.compute_dtype, c.param_dtype, name=name)
    x_BLD = x_BLD + Attention(c, self.dynamics, name="self_attn")(norm("input_layernorm")(x_BLD), seg_BL)
    x_BLD = x_BLD + MLP(c, name="mlp")(norm("post_attention_layernorm")(x_BLD))
    if self.dynamics:
      self.sow("intermediates", "residual", x_BLD)  # the block's output (the residual stream)
    return x_BLD


class Table(nn.Module):
  """One (V, D) weight drawn from a key given by the parent: Levanter passes the SAME key to the embedding and
  the lm_head, so at init lm_head = embedding * sqrt(D) (embedding scale 1/D, Linear scale 1/sqrt(D))."""
  shape: tuple[int, int]
  scale: float
  param_name: str
  transpose: bool
  param_dtype: str
  init_key: jax.Array | None = None

  @nn.compact
  def __call__(self):
    def init(rng):  # rng is used only by flax's apply-time shape check (eval_shape of this init)
      key = rng if self.init_key is None else self.init_key
      w_VD = _truncated_normal(self.scale)(key, self.shape, self.param_dtype)
      return w_VD.T if self.transpose else w_VD
    return self.param(self.param_name, init)


class Transformer(nn.Module):
  """tokens int32[B, L] -> logits float32[B, L, V]; attention never crosses an EOS document boundary.

  With targets_BL, returns the per-token loss statistics of kernels/loss.py instead ({nll, logz, correct, top5},
  float32[B, L] each), computed blockwise so that no [B, L, V] array exists. With features=True, returns the final
  hidden states x[B, L, D] (compute dtype) and the lm_head [D, V] (param dtype): the fused loss's inputs.
  """
  cfg: ModelConfig
  eos_id: int
  dynamics: bool = False  # sow activations and attention-logit statistics (the dynamics step's forward pass)

  @nn.compact
  def __call__(self, tokens_BL, targets_BL=None, features: bool = False):
    c = self.cfg
    V, D = c.vocab_size, c.hidden_dim
    key = self.make_rng("params") if self.is_initializing() else None
    table = lambda name, param, scale, transpose: Table(
        (V, D), scale, param, transpose, c.param_dtype, key, name=name)()
    embedding_VD = table("embed_tokens", "embedding", 1.0 / D, False)
    x_BLD = jnp.take(embedding_VD.astype(c.compute_dtype), tokens_BL, axis=0)
    seg_BL = segment_ids(tokens_BL, self.eos_id)
    block = nn.remat(Block) if c.remat == "block" else Block
    for i in range(c.num_layers):
      x_BLD = block(c, self.dynamics, name=f"layers_{i}")(x_BLD, seg_BL)
    x_BLD = RMSNorm(c.layer_norm_epsilon, c.compute_dtype, c.param_dtype, name="norm")(x_BLD)
    head_DV = embedding_VD.T if c.tie_word_embeddings else table("lm_head", "kernel", D ** -0.5, True)
    if features:
      return x_BLD, head_DV
    head_DV = head_DV.astype(c.compute_dtype)
    with jax.named_scope(LOSS_SCOPE):
      if targets_BL is None:
        return jnp.dot(x_BLD, head_DV).astype(jnp.float32)
      if c.loss_block_size == 0:
        return loss.reference_stats(x_BLD, head_DV, targets_BL)
      return loss.token_stats(x_BLD, head_DV, targets_BL, c.loss_block_size)


def targets_and_mask(tokens_BL):
  """Levanter windows are seq_len tokens: the target of position t is token t+1 and the last position is masked."""
  targets_BL = jnp.roll(tokens_BL, -1, axis=1)
  return targets_BL, jnp.ones(tokens_BL.shape, jnp.float32).at[:, -1].set(0.0)


def token_stats(model: Transformer, params, tokens_BL):
  """({nll, logz, correct, top5} float32[B, L], targets_BL, mask_BL) of next-token prediction on a window batch."""
  targets_BL, mask_BL = targets_and_mask(tokens_BL)
  return model.apply({"params": params}, tokens_BL, targets_BL), targets_BL, mask_BL


def next_token_loss(model: Transformer, params, tokens_BL, z_loss_weight: float):
  """(mean NLL + z_loss_weight x mean logsumexp^2, mean NLL) over the loss positions: the training objective.

  model.loss_impl "fused" / "pallas_*": kernels/loss.fused_loss (the lm_head's gradients formed in the forward pass,
  by XLA or by the Pallas kernels); "blockwise"
  or loss_block_size 0: the per-token statistics, differentiated by JAX (a rematerialised scan, or unblocked)."""
  c = model.cfg
  targets_BL, mask_BL = targets_and_mask(tokens_BL)
  n = mask_BL.sum()
  impl = c.loss_kernel()
  if impl != "blockwise" and c.loss_block_size:
    x_BLD, head_DV = model.apply({"params": params}, tokens_BL, features=True)
    with jax.named_scope(LOSS_SCOPE):
      total, nll = loss.fused_loss(x_BLD, head_DV, targets_BL, mask_BL, z_loss_weight, c.loss_block_size,
                                   c.compute_dtype, impl, c.kernel_interpret)
    return total / n, nll / n
  stats = model.apply({"params": params}, tokens_BL, targets_BL)
  nll = (stats["nll"] * mask_BL).sum() / n
  return nll + z_loss_weight * (stats["logz"] ** 2 * mask_BL).sum() / n, nll
