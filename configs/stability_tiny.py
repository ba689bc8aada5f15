"""A CPU-sized LR-stability proxy (Wortsman et al. 2023): AdamW on a d-64, 2-layer model, 200 steps per LR.

COMMAND:  python -m tinyjax.stability --config=configs/stability_tiny.py --lrs 1e-3,3e-3,1e-2,3e-2,1e-1,3e-1,5e-1,1 \
            --vary model.use_qk_norm=False,True --workdir-root=workdir/stability_tiny
HARDWARE: a 2-core CPU (no GPU, no network): 2m40s for the 16 runs (~10 s each, mostly start-up) on the project
          machine, after the python-docs cache for the 512-token BPE exists.
EXPECTED: (deterministic on CPU) initial loss 6.71; best final loss 4.13 (QK-norm off) / 4.03 (on), both at lr 1e-2.
          Boundary: off lr 1, on lr 0.5 (loss-blowup at step 24; stopped by step 28 of 200). LR sensitivity 0.870
          (off) / 1.043 (on); recommended lr 0.5 / 0.1. QK-norm moves the boundary DOWN here (one 2x grid step) while
          lowering the loss at every LR <= 0.3: at this size the high-LR failure is an early loss spike after warmup,
          not the slow attention-logit growth QK-norm fights at scale. Figure: docs/tiny_stability.png.
"""
from tinyjax import config


def get_config():
  c = config.base()
  m = c.model  # small enough that one short run is seconds on a CPU, large enough to show attention-logit growth
  m.hidden_dim, m.intermediate_dim, m.num_layers, m.num_heads, m.num_kv_heads = 64, 192, 2, 2, 2
  m.seq_len, m.vocab_size = 64, 512
  t = c.train
  t.train_batch_size, t.num_train_steps = 8, 200
  t.steps_per_eval, t.log_every, t.max_eval_batches = 1000, 4, 1  # one eval, at the end
  t.loss_spike_ratio, t.tensorboard = 0.0, False  # the stability finder judges divergence itself
  config.adamw_defaults(c)  # Wortsman et al.: AdamW (0.9, 0.95, eps 1e-8), clip 1.0, cosine decay
  o = c.optimizer
  o.learning_rate, o.warmup, o.weight_decay = 1e-2, 0.05, 0.0
  c.checkpoint.enabled = False  # short runs: a stopped run is recorded by tinyjax.stability, never resumed
  return c
