"""Test setup: 8 fake CPU devices (sharding tests) before JAX initialises, and fast-compiling XLA."""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (must follow the XLA_FLAGS line)

jax.config.update("jax_threefry_partitionable", True)
# Faster XLA compiles for tests (flax lm1b's trick); numerics stay deterministic within a run.
jax.config.update("jax_disable_most_optimizations", True)
