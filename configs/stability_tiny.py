"""A CPU-sized LR-stability proxy (Wortsman et al. 2023): AdamW on a d-64, 2-layer model, 200 steps per LR.

COMMAND:  python -m tinyjax.stability --config=configs/stability_tiny.py --lrs 1e-3,3e-3,1e-2,3e-2,1e-1,3e-1,5e-1,1 \
            --vary model.use_qk_norm=False,True --workdir-root=workdir/stability_tiny
HARDWARE: a 2-core CPU (no GPU, no network), minutes for the 16 runs once the python-docs cache for the 512-token
          BPE exists.
EXPECTED: README "Finding the LR stability boundary": the best loss per setting, the divergence boundary, the LR sensitivity and the
          recommended LR of this grid (figure: docs/tiny_stability.png); the bits are the CPU's (BUILD_NOTES).
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
