"""The one place that turns `config.env` into process settings, before anything initialises the JAX backend.

It returns a record of what is in force (recorded with the run), and refuses to run once the backend is up,
since XLA reads these flags only at backend initialisation and a late setting would be silently ignored.
"""
from __future__ import annotations

import os

import jax

RECORDED_PREFIXES = ("XLA_", "JAX_", "LIBTPU_", "TPU_", "NCCL_", "CUDA_", "TF_")


class EnvError(RuntimeError):
  pass


def backend_initialized() -> bool:
  from jax._src import xla_bridge  # private, but the only reliable probe; checked on jax 0.10.2
  return bool(getattr(xla_bridge, "_backends", {}))


def apply(env_cfg) -> dict:
  """Set env vars and jax.config options from config.env; returns the environment record."""
  if backend_initialized():
    raise EnvError("config.env must be applied before the JAX backend initialises (something already "
                   "called jax.devices() or ran a computation)")
  if env_cfg.platform:
    os.environ["JAX_PLATFORMS"] = env_cfg.platform
  flags = os.environ.get("XLA_FLAGS", "").split()
  if env_cfg.host_device_count > 0:
    flags = [f for f in flags if not f.startswith("--xla_force_host_platform_device_count")]
    flags.append(f"--xla_force_host_platform_device_count={env_cfg.host_device_count}")
  flags += env_cfg.xla_flags.split()
  if flags:
    os.environ["XLA_FLAGS"] = " ".join(flags)
  jax.config.update("jax_threefry_partitionable", env_cfg.jax_threefry_partitionable)
  jax.config.update("jax_softmax_custom_jvp", env_cfg.jax_softmax_custom_jvp)
  if env_cfg.jax_default_matmul_precision:
    jax.config.update("jax_default_matmul_precision", env_cfg.jax_default_matmul_precision)
  if env_cfg.compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(env_cfg.compilation_cache_dir))
  return record()


def record() -> dict:
  """Environment variables and jax options in force now (whether or not config.env set them)."""
  env = {k: v for k, v in sorted(os.environ.items()) if k.startswith(RECORDED_PREFIXES)}
  options = {name: getattr(jax.config, name) for name in (
      "jax_threefry_partitionable", "jax_softmax_custom_jvp", "jax_default_matmul_precision",
      "jax_compilation_cache_dir", "jax_enable_x64")}
  return {"environment": env, "jax_config": options}
