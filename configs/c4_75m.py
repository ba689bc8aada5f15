"""Marin's llama_75m shape + Muon at 1x Chinchilla (no Marin Muon entry exists at 75m; settings documented below).

COMMAND:  python -m tinyjax.main --config=configs/c4_75m.py --workdir=runs/c4_75m
DRY RUN:  python -m tinyjax.main --config=configs/c4_75m.py --dry_run
HARDWARE: one H100/H200 (about 1.5 B tokens).
EXPECTED: model_size 73,273,600; 11,444 steps x 128 x 1024 = 1,499,987,968 tokens. Reference point: Marin's AdamW
          `llama_75m` (3.1B tokens, batch 512) reached c4_en bpb 1.27887.
MUON:     our choice, unvalidated: the llama_50m_muon_1x preset (lr 0.02 / adam_lr 0.004, momentum 0.95, beta 0.8/0.98,
          eps 1e-15, wd 0, 80% linear decay) — between Marin's 50m (0.02) and 130m (0.016) Muon learning rates.
DATA:     Marin's speedrun data (config.marin_speedrun; `python -m tinyjax.data --config=...` fetches it first:
          README "Data").
"""
from tinyjax import config


def get_config():  # 20 * 75e6 // (128 * 1024) = 11,444 steps
  return config.marin_speedrun("llama_75m", 75_000_000, learning_rate=0.02, adam_lr=0.004)
