"""Marin's llama_75m shape + Muon at 1x Chinchilla (no Marin Muon entry exists at 75m; settings documented below).

COMMAND:  python -m tinyjax.main --config=configs/c4_75m.py --workdir=runs/c4_75m
DRY RUN:  python -m tinyjax.main --config=configs/c4_75m.py --dry_run
HARDWARE: one H100/H200 (about 1.5 B tokens).
EXPECTED: model_size 73,273,600; 11,444 steps x 128 x 1024 = 1,499,987,968 tokens. Reference point: Marin's AdamW
          `llama_75m` (3.1B tokens, batch 512) reached c4_en bpb 1.27887.
MUON:     our choice, unvalidated: the llama_50m_muon_1x preset (lr 0.02 / adam_lr 0.004, momentum 0.95, beta 0.8/0.98,
          eps 1e-15, wd 0, 80% linear decay) — between Marin's 50m (0.02) and 130m (0.016) Muon learning rates.
DATA:     Marin's data arrives with the real-corpus work; until then the built-in corpus (not comparable).
"""
from tinyjax import config


def get_config():
  c = config.base()
  config.marin_model(c, "llama_75m")
  c.train.train_batch_size = 128
  c.train.chinchilla_multiple = 1.0  # 20 * 75e6 // (128 * 1024) = 11,444 steps
  c.train.nominal_params = 75_000_000
  o = c.optimizer
  o.name = "muon"
  o.learning_rate, o.adam_lr = 0.02, 0.004
  o.momentum, o.nesterov = 0.95, True
  o.beta1, o.beta2, o.epsilon, o.muon_epsilon = 0.8, 0.98, 1e-15, 1e-5
  o.weight_decay, o.max_grad_norm = 0.0, 1.0
  o.warmup, o.decay, o.min_lr_ratio, o.lr_schedule = 0.0, 0.8, 0.0, "linear"
  o.coefficient_type = "simple"
  return c
