"""What training dynamics cost: the tiny run's throughput with train.dynamics_every=N against 0 (target: within 2%).

python -m tinyjax.benchmarks.dynamics_overhead [--every 100] [--rounds 5] [--steps 20]

Builds the tiny config's real ordinary step and its dynamics variant (step.Built.make, compiled ahead as
train.run does) and times them interleaved in this process — `--steps` ordinary steps, then `--steps` dynamics
steps, `--rounds` times — so that machine load hits both alike. With t the median ordinary step time and d the
median dynamics step time (including the host fetch of its statistics), a run with dynamics every N steps has
throughput ratio N*t / ((N-1)*t + d) against dynamics off; that ratio is the figure reported.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import jax
import numpy as np

from tinyjax import sharding, step
from tinyjax.benchmarks.checkpoint_stall import _tiny


def _steps(cfg):
  built = step.build(cfg, sharding.make_mesh(dataclasses.make_dataclass("M", [("data", int)])(1)), eos_id=1)
  plain, info = step.compile_for_device(built, cfg)
  with jax.set_mesh(built.batch_sh.mesh):
    dyn = built.make(info["grad_accum_steps"], with_dynamics=True)
    dyn = dyn.lower(*built.abstract_inputs(cfg.train.train_batch_size)).compile()
  return plain, dyn, built.init(), built.batch_sh


def _time(step, state, tokens, n: int, fetch_dynamics: bool):
  t = time.perf_counter()
  for _ in range(n):
    state, out = step(state, tokens)
    if fetch_dynamics:
      jax.device_get(out["dynamics"])  # the dynamics log fetches every row it writes
  jax.block_until_ready((state, out))
  return (time.perf_counter() - t) / n, state


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--every", type=int, default=100)
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--steps", type=int, default=20)
  args = parser.parse_args()
  cfg = _tiny(1000)
  plain, dyn, state, batch_sh = _steps(cfg)
  rng = np.random.default_rng(0)
  tokens = sharding.to_global(rng.integers(0, cfg.model.vocab_size, (cfg.train.train_batch_size, cfg.model.seq_len),
                                           dtype=np.int32), batch_sh)
  times = {"ordinary": [], "dynamics": []}
  _, state = _time(plain, state, tokens, 2, False)  # warm both
  _, state = _time(dyn, state, tokens, 2, True)
  for _ in range(args.rounds):
    t, state = _time(plain, state, tokens, args.steps, False)
    times["ordinary"].append(t)
    t, state = _time(dyn, state, tokens, args.steps, True)
    times["dynamics"].append(t)
  t, d = statistics.median(times["ordinary"]), statistics.median(times["dynamics"])
  n = args.every
  print(json.dumps({"dynamics_every": n, "step_seconds": times, "median_ordinary_s": t, "median_dynamics_s": d,
                    "dynamics_step_cost_in_ordinary_steps": d / t,
                    "throughput_ratio_on_over_off": n * t / ((n - 1) * t + d)}, indent=2))


if __name__ == "__main__":
  main()
