"""Marin's "130m" (llama_150m at seq 4096) + Muon at 1x Chinchilla: mirrors `muon_llama_scaling/130m`.

COMMAND:  python -m tinyjax.main --config=configs/c4_130m.py --workdir=runs/c4_130m
DRY RUN:  python -m tinyjax.main --config=configs/c4_130m.py --dry_run
HARDWARE: Marin used a TPU v5p-32 (16 chips, 1,205 s); on GPUs, 8xH100 or more (or grad_accum_steps on fewer).
          libtpu's own plan: --dry_run --target=v5p-32.
EXPECTED: model_size 154,147,328; 4,959 steps x 128 x 4096 = 2,599,944,192 tokens; model_flops 1.78e18;
          Marin's result: eval/paloma/c4_en/bpb = 1.16984.
DATA:     Marin's speedrun data (config.marin_speedrun; `python -m tinyjax.data --config=...` fetches it first:
          README "Data").
"""
from tinyjax import config


def get_config():  # muon_llama_scaling/muon_sweep.py ("Fantastic Optimizers" presets): 20 * 130e6 // (128 * 4096) = 4,959
  c = config.marin_speedrun("llama_150m", 130_000_000, learning_rate=0.016, adam_lr=0.0032, weight_decay=0.1,
                            seq_len=4096)  # the scaling sweeps replace llama_150m's 1024 by 4096
  c.train.plan_num_devices = 16  # --dry_run's CPU plan: Marin's v5p-32 (16 chips: 8 x 4096 tokens per chip)
  return c
