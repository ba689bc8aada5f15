"""How much checkpoint saves stall the training loop (the target: < 5% of step time at the default interval).

python -m tinyjax.benchmarks.checkpoint_stall [--steps 200] [--every 20]

Runs the tiny config twice in this process — checkpoints off, then a save every `--every` steps — and reports the
summed step time (Marin's training_time, excluding eval) of each, their ratio, and the blocking time of each
save() call; then extrapolates the stall to the default interval (checkpoint.save_interval_steps).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

from tinyjax import config, env, train
from tinyjax.runtime import checkpoint


def _tiny(steps: int):
  import importlib.util
  spec = importlib.util.spec_from_file_location("tiny", os.path.join(os.path.dirname(__file__), "..", "..",
                                                                      "configs", "tiny.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = module.get_config()
  cfg.train.num_train_steps, cfg.train.steps_per_eval, cfg.train.log_every = steps, steps, 10
  return cfg


def measure(steps: int, every: int) -> dict:
  blocking = []
  save = checkpoint.Checkpointer.save

  def timed_save(self, *args, **kwargs):
    t = time.perf_counter()
    save(self, *args, **kwargs)
    blocking.append(time.perf_counter() - t)
  checkpoint.Checkpointer.save = timed_save
  try:
    cfg = _tiny(steps)
    cfg.checkpoint.enabled = every > 0
    cfg.checkpoint.save_interval_steps, cfg.checkpoint.save_interval_minutes = every, 0.0
    with tempfile.TemporaryDirectory() as workdir:
      last = train.run(cfg, workdir, env.record())
  finally:
    checkpoint.Checkpointer.save = save
  return {"training_time": last["training_time"], "saves": len(blocking), "blocking_s": blocking}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--every", type=int, default=20)
  args = parser.parse_args()
  off, on = measure(args.steps, 0), measure(args.steps, args.every)
  step_time = off["training_time"] / args.steps
  per_save = sum(on["blocking_s"]) / max(on["saves"], 1)
  default_every = config.base().checkpoint.save_interval_steps
  print(json.dumps({
      "steps": args.steps, "save_every": args.every, "step_time_s": step_time,
      "training_time_off_s": off["training_time"], "training_time_on_s": on["training_time"],
      "ratio_on_over_off": on["training_time"] / off["training_time"], "saves": on["saves"],
      "mean_blocking_save_s": per_save,
      "stall_at_this_interval": per_save / (args.every * step_time),
      f"stall_at_default_interval_{default_every}_steps": per_save / (default_every * step_time),
  }, indent=2))


if __name__ == "__main__":
  main()
