"""A CPU-sized batch-size grid on configs/tiny.py: batch 4, 8, 16 x {fixed LR, sqrt-scaled from 16} at equal tokens.

COMMAND:  python -m tinyjax.sweep configs/sweeps/tiny.py --launch local --report
          (6 points one after another, then workdir/sweeps/tiny/{report.csv,batch.png,curves.png})
HARDWARE: the project's 2-core CPU; the measured wall time and table are in BUILD_NOTES.md.
Like the paper's grid, every point trains the same tokens (80 x 4 x 128 = 40,960: fewer steps at larger batches),
and the two LR rules coincide at the base batch (16, configs/tiny.py's own batch).
"""


def get_sweep():
  return {
      "config": "configs/tiny.py",
      # one eval set for every point: 4 batches of 16 windows (the default eval batch is the train batch), every 10
      # steps (every 1,280 tokens x batch/4) so that curves.png has BPB curves, not one final point per run
      "fixed": {"train.log_every": 10, "train.steps_per_eval": 10, "train.eval_batch_size": 16,
                "train.max_eval_batches": 4, "train.sample_prompts": "()"},
      "axes": [
          [{"train.train_batch_size": b, "train.num_train_steps": 320 // b} for b in (4, 8, 16)],
          [{"optimizer.lr_scaling_base_batch": 0}, {"optimizer.lr_scaling_base_batch": 16}],
      ],
      "figures": [{"kind": "batch", "group_by": "optimizer.lr_scaling_base_batch"},
                  {"kind": "curves", "x": "tokens"}],  # equal tokens: the size figure is tiny_scaling.py's
  }
