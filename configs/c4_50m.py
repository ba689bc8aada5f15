"""llama_50m + Muon at 1x Chinchilla: mirrors Marin's leaderboard entry `llama_50m_muon_1x` exactly.

COMMAND:  python -m tinyjax.main --config=configs/c4_50m.py --workdir=runs/c4_50m
DRY RUN:  python -m tinyjax.main --config=configs/c4_50m.py --dry_run
HARDWARE: one H100/H200 (Marin ran it on 1xH200 in 1,179 s of step time); any GPU/TPU with >= 16 GB.
EXPECTED: model_size 50,874,048; 7,629 steps x 128 x 1024 = 999,948,288 tokens; model_flops 1.6698528441040896e17;
          Marin's result: eval/paloma/c4_en/bpb = 1.398867 (FineWeb-Edu 10B subcache, Paloma c4_en val).
DATA:     Marin's: train on the FineWeb-Edu 10B subcache (hf://datasets/marin-community/fineweb-edu-pretokenized-10B,
          a Levanter cache in Llama-3 ids, ~20 GB, mirrored once into data.cache_dir and read as-is), tokenizer
          stanford-crfm/marin-tokenizer, eval on Paloma c4_en val (allenai/paloma@65cd6fc, a gated HF dataset: accept
          its terms and `huggingface-cli login`) as eval/paloma/c4_en/bpb. `python -m tinyjax.data --config=...`
          fetches and builds everything ahead of a run; see README "Data".
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
  d = c.data  # Marin speedrun data (experiments/speedrun: fineweb_edu_subcache_10B + Paloma c4_en val)
  d.tokenizer = "stanford-crfm/marin-tokenizer"  # = Llama-3 ids (128,256); the 10B cache was built with them
  d.train_urls = ["hf://datasets/marin-community/fineweb-edu-pretokenized-10B/train"]  # prebuilt Levanter cache
  d.validation_urls = {"paloma/c4_en": ["hf://datasets/allenai/paloma@65cd6fc/c4_en/val/val*.jsonl.gz"]}
  return c
