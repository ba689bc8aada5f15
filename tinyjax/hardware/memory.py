"""The memory plan: what one device holds during a train step, analytic and as XLA compiles it, against the device.

Before a run allocates anything, `check` compiles the real step for this mesh (`jit(...).lower(...).compile()`:
shapes only) and reads XLA's buffer assignment (`memory_analysis()`); a step that does not fit is a one-line error
naming the figures and the fix, instead of an out-of-memory error minutes later. `train.grad_accum_steps=0` picks the
smallest accumulation that fits. `--dry_run` prints the same plan for the devices Marin's runs used.
"""
from __future__ import annotations

import os
import re

from tinyjax import flops
from tinyjax.errors import ConfigError
from tinyjax.kernels import attention, loss

GIB = 2 ** 30
# Memory of one JAX device in bytes, matched as a substring of jax.Device.device_kind (most specific first).
# GPUs: NVIDIA data sheets (H100 SXM/PCIe 80 GB HBM3, H200 141 GB HBM3e, A100 40/80 GB). TPUs: Cloud TPU system
# architecture pages (HBM per chip: v4 32 GiB, v5p 95 GiB, v5e 16 GiB, v6e 32 GiB; v3 32 GiB per chip = 16 per core).
# JAX names a v5p chip "TPU v5" and a v5e chip "TPU v5 lite" (seen in libtpu's compile-only devices), so "TPU v5 lite"
# must come before "TPU v5".
DEVICE_MEMORY = (
    ("H100", 80e9), ("H200", 141e9), ("A100-SXM4-40GB", 40e9), ("A100-PCIE-40GB", 40e9), ("A100", 80e9),
    ("TPU v6", 32 * GIB), ("TPU v5 lite", 16 * GIB), ("TPU v5e", 16 * GIB), ("TPU v5p", 95 * GIB),
    ("TPU v5", 95 * GIB), ("TPU v4", 32 * GIB), ("TPU v3", 16 * GIB),
)
# The devices --dry_run reports (Marin's hardware and common alternatives): name -> (device_kind, platform).
PLAN_DEVICES = {"H100 80GB": ("NVIDIA H100 80GB HBM3", "gpu"), "H200": ("NVIDIA H200", "gpu"),
                "A100 40GB": ("NVIDIA A100-SXM4-40GB", "gpu"), "TPU v4": ("TPU v4", "tpu"),
                "TPU v5p": ("TPU v5p", "tpu")}
GPU_DEFAULT_FRACTION = 0.75  # XLA's GPU client preallocates / caps its pool at 75% of device memory by default
MEM_FRACTION_VARS = ("XLA_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_MEM_FRACTION")  # config.env sets them


def device_memory(device_kind: str, override_gb: float = 0.0) -> float | None:
  """Bytes of one device: the override, the table, or (CPU) the host's RAM; None when unknown."""
  if override_gb:
    return override_gb * 1e9
  for key, value in DEVICE_MEMORY:
    if key.lower() in device_kind.lower():
      return float(value)
  if device_kind.lower() == "cpu":
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
  return None


def usable_fraction(platform: str) -> float:
  """Share of device memory XLA lets the program use: on GPU the client's memory fraction (env or 0.75)."""
  if platform not in ("gpu", "cuda", "rocm"):
    return 1.0
  for var in MEM_FRACTION_VARS:
    if os.environ.get(var):
      return float(os.environ[var])
  return GPU_DEFAULT_FRACTION


def analytic(cfg, model_cfg, per_device_batch: int, accum: int, data_size: int, platform: str) -> dict:
  """A bytes-per-device estimate by part (state from the parameter count; activations per token and layer)."""
  n = flops.param_counts(model_cfg)["model_size"]
  shard = data_size if cfg.mesh.fsdp else 1
  muon = cfg.optimizer.name == "muon"
  embed = model_cfg.vocab_size * model_cfg.hidden_dim * (1 if model_cfg.tie_word_embeddings else 2)
  opt_floats = (n - embed) + 2 * embed if muon else 2 * n  # Muon momentum for matrices, Adam mu+nu for the rest
  b, L, D, F, H = per_device_batch // max(accum, 1), model_cfg.seq_len, model_cfg.hidden_dim, \
      model_cfg.intermediate_dim, model_cfg.num_heads
  act = 2  # bf16 activations
  per_token_layer = act * (8 * D + 3 * F)  # saved for backward: norms, q/k/v/o, residuals, gate/up/hidden
  if model_cfg.remat == "block":
    per_token_layer = act * D
  impl = model_cfg.attention_impl(platform)
  attn_bytes = attention.analytic_bytes(impl, b, L, H, model_cfg.head_dim, model_cfg.attention_block)
  tokens = b * L
  loss_bytes = (loss.analytic_bytes(tokens, model_cfg.vocab_size, model_cfg.loss_block_size)
                if model_cfg.loss_block_size else tokens * model_cfg.vocab_size * (4 + 4 + 2))
  out = {"params": 4 * n // shard, "optimizer_state": 4 * opt_floats // shard, "gradients": 4 * n // shard,
         "activations": tokens * model_cfg.num_layers * per_token_layer + attn_bytes, "loss_buffers": loss_bytes}
  out["total"] = sum(out.values())
  return out


def analysis(executable) -> dict:
  """XLA's buffer assignment of a compiled function (`jit(f).lower(*shapes).compile()`: nothing is allocated)."""
  ma = executable.memory_analysis()
  out = {"argument": ma.argument_size_in_bytes, "output": ma.output_size_in_bytes,
         "alias": ma.alias_size_in_bytes, "temp": ma.temp_size_in_bytes,
         "code": ma.generated_code_size_in_bytes}
  out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"] + out["code"]
  return out


_COMPILER_OOM = re.compile(r"RESOURCE_EXHAUSTED: Ran out of memory.*?required for HLO temporaries \(([\d.]+)([KMGT])\)")


def compiler_oom(error: Exception) -> tuple[dict, str] | None:
  """(figures, the compiler's line) when a compiler refused the program for lack of device memory, else None.

  libtpu does not compile a program that cannot fit: it rematerialises what it can (tiny at 8,192 x 128 tokens per
  chip compiled to 14.7 of a v5e's 16 GiB), then fails with RESOURCE_EXHAUSTED naming the temporaries it would need.
  Those become the plan's temp and peak (arguments unknown: a lower bound)."""
  match = _COMPILER_OOM.search(str(error))
  if match is None:
    return None
  needed = float(match.group(1)) * {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}[match.group(2)]
  line = next((line for line in str(error).splitlines() if "RESOURCE_EXHAUSTED" in line), "").strip()
  return {"argument": 0, "output": 0, "alias": 0, "temp": needed, "code": 0, "peak": needed}, line[:300]


def fits(peak: float, total: float | None, platform: str) -> dict:
  """Whether `peak` bytes fit a device of `total` bytes (None: unknown) as XLA lets a program use it."""
  usable = None if total is None else total * usable_fraction(platform)
  return {"device_memory_gib": None if total is None else round(total / GIB, 2),
          "usable_gib": None if usable is None else round(usable / GIB, 2),
          "fits": None if usable is None else bool(peak <= usable)}


def gib(d: dict) -> dict:
  return {k: round(v / GIB, 3) for k, v in d.items()}


def refuse(cfg, peak: float, fit: dict, device_kind: str, accum: int) -> None:
  t = cfg.train
  raise ConfigError(
      f"the train step needs {peak / GIB:.1f} GiB per device but {device_kind} offers {fit['usable_gib']} GiB "
      f"(config.train.train_batch_size={t.train_batch_size}, grad_accum_steps={accum}, "
      f"model.loss_block_size={cfg.model.loss_block_size}, model.attention={cfg.model.attention}); set "
      f"config.train.grad_accum_steps=0 (auto) or a larger value, model.remat=block, or more devices")
