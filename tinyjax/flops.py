"""Marin's parameter count, Levanter's forward FLOPs per token, device peak FLOP/s, and MFU.

Formulas: Levanter (github.com/stanford-crfm/levanter) src/levanter/models/llama.py total_trainable_params,
src/levanter/utils/flop_utils.py lm_flops_per_token; peaks: Marin lib/fray/src/fray/cluster/device_flops.py.
Checked against the figures in tinyjax/reference/ (tests/test_flops.py).
"""
from __future__ import annotations

from tinyjax.model import ModelConfig


def param_counts(c: ModelConfig) -> dict[str, int]:
  """Levanter LlamaConfig.total_trainable_params, split as Marin reports it (embedding + untied head included)."""
  d, hd = c.hidden_dim, c.head_dim
  attn = d * c.num_heads * hd + 2 * d * c.num_kv_heads * hd + c.num_heads * hd * d  # q, k, v, o
  per_layer = attn + 3 * d * c.intermediate_dim + 2 * d  # + gate/up/down + two RMSNorm weights
  if c.use_qk_norm:  # not in Marin's Llama formula: q_norm and k_norm weights (qwen3-style option)
    per_layer += 2 * hd
  embedding = c.vocab_size * d
  head = 0 if c.tie_word_embeddings else c.vocab_size * d
  total = c.num_layers * per_layer + d + embedding + head  # + final norm
  return {"model_size": total, "non_embedding_params": total - embedding - head,
          "embedding_params": embedding, "lm_head_params": head}


def flops_per_token(c: ModelConfig, seq_len: int | None = None) -> int:
  """Levanter lm_flops_per_token(glu=True): forward FLOPs per token; attention as a full (non-causal) SxS map."""
  d, hd, S = c.hidden_dim, c.head_dim, seq_len or c.seq_len
  H, K = c.num_heads, c.num_kv_heads
  mlp = 2 * 3 * d * c.intermediate_dim
  qkv = 2 * d * (H * hd + 2 * K * hd)
  o = 2 * d * d
  attn = S * (2 * H * hd + 3 * H + 2 * hd * H)  # (2·S²·H·hd + 3·S²·H + 2·S²·hd·H) / S, kept exact
  return c.num_layers * (mlp + qkv + o + attn) + 2 * d * c.vocab_size  # + lm_head; embedding lookup counts 0


def model_flops(c: ModelConfig, total_tokens: int, seq_len: int | None = None) -> float:
  """SpeedrunConfig.compute_model_flops: 3 (forward + backward) x forward FLOPs/token x tokens."""
  return float(3 * flops_per_token(c, seq_len) * total_tokens)


# Peak dense bf16 FLOP/s per chip (Marin lib/fray/src/fray/cluster/device_flops.py; Levanter DEFAULT_AVAILABLE_FLOPS).
# Keys are matched as substrings of jax.Device.device_kind, most specific first.
PEAK_FLOPS = (
    ("H100 PCIe", 756.5e12),
    ("H100", 989.5e12),  # SXM: 1.979e15 sparse / 2
    ("H200", 989.5e12),
    ("A100", 312e12),
    ("A40", 149.7e12),
    ("L4", 242e12),
    ("A10", 125e12),
    ("TPU v6", 918e12),
    ("TPU v5 lite", 197e12),  # v5e's device_kind; before "TPU v5", which is how JAX names a v5p chip
    ("TPU v5e", 197e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),
    ("TPU v4", 275e12),
    ("TPU v3", 61.5e12),  # 123e12 per chip / 2 cores, per device
)


def peak_flops(device_kind: str) -> float | None:
  """Peak bf16 FLOP/s of one device, or None when unknown (CPUs: we do not invent a number)."""
  for key, value in PEAK_FLOPS:
    if key.lower() in device_kind.lower():
      return value
  return None


def mfu(tokens_per_second: float, fpt: int, device_kind: str, num_devices: int) -> float | None:
  """Levanter throughput/mfu: 3·fpt·tokens/s over the summed device peak."""
  peak = peak_flops(device_kind)
  return None if peak is None else 3 * fpt * tokens_per_second / (peak * num_devices)
