"""The paper's batch-size grid: c4_50m at 2x Chinchilla, batch 16..256 x {fixed LR, sqrt-scaled from 128} x warmup.

COMMAND:  python -m tinyjax.sweep configs/sweeps/batch_size.py --launch tpu --root gs://BUCKET/sweeps/batch_size \
            -- --name=tj-v4 --zone=us-central2-b --accelerator-type=v4-8 --repo=https://github.com/OWNER/tinyjax
          python -m tinyjax.sweep configs/sweeps/batch_size.py --launch slurm --root /shared/sweeps/batch_size \
            -- --partition=gpu --nodes=1 --gpus-per-node=8
REPORT:   python -m tinyjax.sweep configs/sweeps/batch_size.py --report --root DIR  (report.csv, batch.png)
20 points. Every point trains the same tokens (2 x 20 x nominal params): a smaller batch takes more steps.
"""


def get_sweep():
  return {
      "config": "configs/c4_50m.py",
      # eval_batch_size fixed: Marin ties it to the train batch, which would drop a different remainder of the
      # Paloma c4_en windows at each point; 128 is Marin's batch for this model, so that point matches Marin's.
      "fixed": {"train.chinchilla_multiple": 2.0, "train.eval_batch_size": 128},
      "axes": [
          [{"train.train_batch_size": b} for b in (16, 32, 64, 128, 256)],
          # 0 = the config's LR at every batch; 128 = LR x sqrt(batch / 128) (config.lr_multiplier)
          [{"optimizer.lr_scaling_base_batch": 0}, {"optimizer.lr_scaling_base_batch": 128}],
          [{"optimizer.warmup": 0.0}, {"optimizer.warmup": 0.05}],
      ],
      "figures": [{"kind": "batch", "group_by": "optimizer.lr_scaling_base_batch,optimizer.warmup"}],
  }
