"""llama_50m + Muon at 1x Chinchilla: mirrors Marin's leaderboard entry `llama_50m_muon_1x` exactly.

COMMAND:  python -m tinyjax.main --config=configs/c4_50m.py --workdir=runs/c4_50m
DRY RUN:  python -m tinyjax.main --config=configs/c4_50m.py --dry_run
HARDWARE: one H100/H200 (Marin ran it on 1xH200 in 1,179 s of step time); any GPU/TPU with >= 16 GB.
EXPECTED: model_size 50,874,048; 7,629 steps x 128 x 1024 = 999,948,288 tokens; model_flops 1.6698528441040896e17;
          Marin's result: eval/paloma/c4_en/bpb = 1.398867 (FineWeb-Edu 10B subcache, Paloma c4_en val).
DATA:     Marin's data (FineWeb-Edu + Paloma c4_en) arrives with the real-corpus work; until then the config trains
          on the built-in corpus with Marin's model/optimizer, which is NOT comparable to the leaderboard.
"""
from tinyjax import config


def get_config():
  c = config.base()
  config.marin_model(c, "llama_50m")
  c.train.train_batch_size = 128
  c.train.chinchilla_multiple = 1.0  # 20 * 50e6 // (128 * 1024) = 7,629 steps, as Marin computes them
  c.train.nominal_params = 50_000_000
  o = c.optimizer  # experiments/speedrun/llama_50m_muon_1x/train.py (PR #2185)
  o.name = "muon"
  o.learning_rate, o.adam_lr = 0.02, 0.004
  o.momentum, o.nesterov = 0.95, True
  o.beta1, o.beta2, o.epsilon, o.muon_epsilon = 0.8, 0.98, 1e-15, 1e-5
  o.weight_decay, o.max_grad_norm = 0.0, 1.0
  o.warmup, o.decay, o.min_lr_ratio, o.lr_schedule = 0.0, 0.8, 0.0, "linear"
  o.coefficient_type = "simple"  # every 2025 Marin Muon run
  return c
