"""llama_50m + Muon at 1x Chinchilla: mirrors Marin's leaderboard entry `llama_50m_muon_1x` exactly.

COMMAND:  python -m tinyjax.main --config=configs/c4_50m.py --workdir=runs/c4_50m
DRY RUN:  python -m tinyjax.main --config=configs/c4_50m.py --dry_run
HARDWARE: one H100/H200 (Marin ran it on 1xH200 in 1,179 s of step time); any GPU/TPU with >= 16 GB.
          Fits one H100 by the CUDA compiler's own plan: --dry_run --target=h100.
EXPECTED: model_size 50,874,048; 7,629 steps x 128 x 1024 = 999,948,288 tokens; model_flops 1.6698528441040896e17;
          Marin's result: eval/paloma/c4_en/bpb = 1.398867 (FineWeb-Edu 10B subcache, Paloma c4_en val).
DATA:     Marin's speedrun data (config.marin_speedrun; `python -m tinyjax.data --config=...` fetches it first:
          README "Data").
"""
from tinyjax import config


def get_config():  # experiments/speedrun/llama_50m_muon_1x/train.py (PR #2185): 20 * 50e6 // (128 * 1024) = 7,629 steps
  return config.marin_speedrun("llama_50m", 50_000_000, learning_rate=0.02, adam_lr=0.004)
