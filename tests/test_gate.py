"""The fast tier's gate on what training computes: the model's jitted forward and backward, a golden run of the train
step, and the same step on one device and on two.

The golden figures are a few steps of tests/small_config.py's step (model, fused loss, Muon + Adam, non-finite guard)
from its seed on fixed token batches, under the tests' XLA settings (conftest: jax_disable_most_optimizations).
Regenerate them with `python tests/test_gate.py` (it prints GOLDEN); a change means the step computes something else:
say why in the commit that changes them.

What is pinned, and how closely: the same run's bits differ between x86 CPUs (matmul blocking and thread
partitioning change float32 summation order, and a bf16 rounding can then flip), so no hash is pinned. The figures
are the loss at every step and each optimizer group's displacement |p_N - p_0| after N steps. Under XLA's other CPU
code paths and one thread (`python tests/test_gate.py --spread`, AMD EPYC: AVX2 and one thread 1e-7 relative, AVX
5e-5, SSE4.2 1.7e-4) they move by at most 1.7e-4; a 0.1% change of every update (optax.apply_updates scaled by 1.001)
moves both displacements by 1.0e-3 and the losses by 7e-5. So the displacements are pinned to 4e-4, between the two;
the losses to 3e-4, which CPUs meet and which a changed model, loss or data order does not.
"""
import functools
import json
import os
import sys

import numpy as np
import pytest

STEPS = 4
LOSS_RTOL, DISPLACEMENT_RTOL = 3e-4, 4e-4


def _small_cfg(**overrides):
  tests = os.path.dirname(os.path.abspath(__file__))
  if tests not in sys.path:  # run as a script (`python tests/test_gate.py`); under pytest conftest put it there
    sys.path.insert(0, tests)
  import support  # noqa: PLC0415
  return support.set_keys(support.load_config(support.SMALL_CONFIG), overrides)


def _batches(cfg, n: int):
  rng = np.random.default_rng(1234)
  return [rng.integers(1, cfg.model.vocab_size, (cfg.train.train_batch_size, cfg.model.seq_len), dtype=np.int32)
          for _ in range(n)]


@functools.cache
def step_figures(data: int = 1) -> dict:
  """The small config's step run STEPS times on fixed batches over a `data`-device mesh: the loss of every step, and
  the displacement of each optimizer group's parameters."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  from tinyjax import optim, sharding, step  # noqa: PLC0415
  cfg = _small_cfg(**{"mesh.data": data})
  built = step.build(cfg, sharding.make_mesh(cfg.mesh), "cpu")
  state = built.init()
  start = jax.device_get(state.params)
  fn = built.make(1)
  losses = []
  for tokens in _batches(cfg, STEPS):
    state, out = fn(state, jax.device_put(tokens, built.batch_sh))
    losses.append(float(out["loss"]))
  end = jax.device_get(state.params)
  groups = jax.tree.leaves(optim.labels(start))
  moved = {}
  for label, a, b in zip(groups, jax.tree.leaves(start), jax.tree.leaves(end)):
    moved[label] = moved.get(label, 0.0) + float(jnp.sum(jnp.square(jnp.asarray(b, jnp.float32) - a)))
  return {"loss": losses, "displacement": {k: v ** 0.5 for k, v in sorted(moved.items())},
          "bad_steps": int(state.bad_steps)}


GOLDEN = {
    "loss": [6.746337890625, 6.7679219245910645, 6.744265079498291, 6.779193878173828],
    "displacement": {"adam": 0.21683155586177208, "muon": 0.03345471205927755},
    "bad_steps": 0,
}


def _close(got: dict, want: dict, loss_rtol: float = LOSS_RTOL, displacement_rtol: float = DISPLACEMENT_RTOL) -> None:
  assert got["bad_steps"] == want["bad_steps"]
  np.testing.assert_allclose(got["loss"], want["loss"], rtol=loss_rtol)
  assert got["displacement"].keys() == want["displacement"].keys()
  for k, v in want["displacement"].items():
    assert got["displacement"][k] == pytest.approx(v, rel=displacement_rtol), \
        f"{k} displacement {got['displacement'][k]} vs {v}: the update changed"


def test_the_small_steps_golden_figures():
  _close(step_figures(), GOLDEN)


def test_one_device_and_two_compute_the_same_step():
  """Data parallelism over two XLA host devices: the gradient all-reduce only reorders float32 sums."""
  _close(step_figures(data=2), step_figures(data=1))


def test_the_jitted_model_is_causal_and_every_parameter_gets_a_gradient():
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  from tinyjax import sharding, step  # noqa: PLC0415
  from tinyjax.model import next_token_loss  # noqa: PLC0415
  cfg = _small_cfg()
  built = step.build(cfg, sharding.make_mesh(cfg.mesh), "cpu")
  params = built.init().params
  tokens = jnp.asarray(_batches(cfg, 1)[0][:2])
  logits = jax.jit(lambda p, t: built.model.apply({"params": p}, t))(params, tokens)
  assert logits.shape == (2, cfg.model.seq_len, cfg.model.vocab_size) and bool(jnp.all(jnp.isfinite(logits)))
  changed = tokens.at[:, -1].set((tokens[:, -1] + 1) % cfg.model.vocab_size)
  again = jax.jit(lambda p, t: built.model.apply({"params": p}, t))(params, changed)
  np.testing.assert_array_equal(np.asarray(logits[:, :-1]), np.asarray(again[:, :-1]))  # the past never sees it
  assert not np.array_equal(np.asarray(logits[:, -1]), np.asarray(again[:, -1]))
  (_, loss), grads = jax.jit(jax.value_and_grad(
      lambda p: next_token_loss(built.model, p, tokens, 0.0), has_aux=True))(params)
  assert 5.5 < float(loss) < 7.0  # ~ln(512) = 6.24 at initialisation
  for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
    assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.max(jnp.abs(g))) > 0, jax.tree_util.keystr(path)


def _spread() -> None:
  """Re-run the golden figures in child processes under each XLA CPU code path and thread count; print the largest
  relative difference from GOLDEN of each."""
  import subprocess  # noqa: PLC0415
  variants = {"default": {}, "avx2": {"XLA_FLAGS": "--xla_cpu_max_isa=AVX2"},
              "sse4_2": {"XLA_FLAGS": "--xla_cpu_max_isa=SSE4_2"},
              "one_thread": {"XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false", "TASKSET": "0"}}
  for name, env in variants.items():
    cmd = [sys.executable, os.path.abspath(__file__)]
    if "TASKSET" in env:
      cmd = ["taskset", "-c", env.pop("TASKSET"), *cmd]
    out = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True, check=True).stdout
    got = json.loads(out)
    diffs = [abs(a / b - 1) for a, b in zip(got["loss"], GOLDEN["loss"])]
    diffs += [abs(got["displacement"][k] / v - 1) for k, v in GOLDEN["displacement"].items()]
    print(f"{name}: max relative difference {max(diffs):.2e}")


if __name__ == "__main__":
  # The tests' XLA settings (tests/conftest.py), then the figures as JSON.
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  if sys.argv[1:] == ["--spread"]:
    _spread()
  else:
    import jax
    jax.config.update("jax_threefry_partitionable", True)
    jax.config.update("jax_disable_most_optimizations", True)
    print(json.dumps(step_figures()))
