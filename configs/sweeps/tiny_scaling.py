"""A CPU-sized data-scaling grid on configs/tiny.py: hidden 64 / 128 x 20, 40, 80 steps at batch 8 (6 points).

COMMAND:  python -m tinyjax.sweep configs/sweeps/tiny_scaling.py --launch local --report
          (workdir/sweeps/tiny_scaling/{report.csv,scaling.png}: final BPB against tokens, one line per model size)
The CPU stand-in for configs/sweeps/model_size.py, whose x axis is the Chinchilla multiple; these models are far
below 1x Chinchilla at any step count a CPU affords, so the x axis here is tokens.
"""


def get_sweep():
  return {
      "config": "configs/tiny.py",
      "fixed": {"train.train_batch_size": 8, "train.log_every": 10, "train.eval_batch_size": 16,
                "train.max_eval_batches": 4, "train.sample_prompts": "()"},
      "axes": [
          [{"model.hidden_dim": 64, "model.intermediate_dim": 224},
           {"model.hidden_dim": 128, "model.intermediate_dim": 448}],
          [{"train.num_train_steps": s} for s in (20, 40, 80)],
      ],
      "figures": [{"kind": "scaling", "group_by": "model_size", "x": "tokens"}],
  }
