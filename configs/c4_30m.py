"""Marin's llama_30m shape + Muon at 1x Chinchilla (no Marin Muon entry exists at 30m; settings documented below).

COMMAND:  python -m tinyjax.main --config=configs/c4_30m.py --workdir=runs/c4_30m
DRY RUN:  python -m tinyjax.main --config=configs/c4_30m.py --dry_run
HARDWARE: one GPU (H100-class: minutes); a laptop CPU can run a few hundred steps for smoke tests.
EXPECTED: model_size 33,784,960; 4,577 steps x 128 x 1024 = 599,916,544 tokens. Reference point: Marin's AdamW
          `llama_30m` (786M tokens, batch 512) reached c4_en bpb 1.52639; a Muon run at 1x should land near it.
MUON:     lr 0.024 / adam_lr 0.0048, momentum 0.95, batch 128 x 1024 — the `llama_30m_muon_4x` README (a third-party
          copy, not in marin main); the rest as llama_50m_muon_1x (beta 0.8/0.98, eps 1e-15, wd 0, 80% linear decay).
DATA:     Marin's speedrun data (config.marin_speedrun; `python -m tinyjax.data --config=...` fetches it first:
          README "Data").
"""
from tinyjax import config


def get_config():  # 20 * 30e6 // (128 * 1024) = 4,577 steps
  return config.marin_speedrun("llama_30m", 30_000_000, learning_rate=0.024, adam_lr=0.0048)
