"""What training dynamics cost: the tiny run's throughput with train.dynamics_every=N against 0 (target: within 2%).

python -m tinyjax.benchmarks.dynamics_overhead [--steps 300] [--every 100] [--rounds 2]

Runs the tiny config in this process, alternating dynamics off / on for `--rounds` rounds (machine load hits both
alike), and reports each run's steady-state tokens/s (training_time, Marin's summed step time, excluding eval and
the first logged step's compile) and the ratio of the medians. The dynamics variant is compiled before the loop,
so its cost here is the extra statistics of the dynamics steps themselves.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile

from tinyjax import env, metrics, train
from tinyjax.benchmarks.checkpoint_stall import _tiny


def measure(steps: int, every: int) -> float:
  cfg = _tiny(steps)
  cfg.checkpoint.enabled, cfg.train.tensorboard, cfg.train.dynamics_every = False, False, every
  with tempfile.TemporaryDirectory() as workdir:
    train.run(cfg, workdir, env.record())
    rows = [r for r in metrics.read(workdir) if "loss" in r and "training_time" in r]
  first, last = rows[0], rows[-1]  # from the first logged step on: the compile is excluded
  return (last["tokens"] - first["tokens"]) / (last["training_time"] - first["training_time"])


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--every", type=int, default=100)
  parser.add_argument("--rounds", type=int, default=2)
  args = parser.parse_args()
  rates = {"off": [], "on": []}
  for _ in range(args.rounds):
    rates["off"].append(measure(args.steps, 0))
    rates["on"].append(measure(args.steps, args.every))
  med = {k: statistics.median(v) for k, v in rates.items()}
  print(json.dumps({"steps": args.steps, "dynamics_every": args.every, "tokens_per_second": rates,
                    "median": med, "ratio_on_over_off": med["on"] / med["off"]}, indent=2))


if __name__ == "__main__":
  main()
