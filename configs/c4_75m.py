"""Marin's llama_75m shape + Muon at 1x Chinchilla (no Marin Muon entry exists at 75m; settings documented below).

COMMAND:  python -m tinyjax.main --config=configs/c4_75m.py --workdir=runs/c4_75m
DRY RUN:  python -m tinyjax.main --config=configs/c4_75m.py --dry_run
HARDWARE: one H100/H200 (about 1.5 B tokens).
EXPECTED: model_size 73,273,600; 11,444 steps x 128 x 1024 = 1,499,987,968 tokens. Reference point: Marin's AdamW
          `llama_75m` (3.1B tokens, batch 512) reached c4_en bpb 1.27887.
MUON:     our choice, unvalidated: the llama_50m_muon_1x preset (lr 0.02 / adam_lr 0.004, momentum 0.95, beta 0.8/0.98,
          eps 1e-15, wd 0, 80% linear decay) — between Marin's 50m (0.02) and 130m (0.016) Muon learning rates.
DATA:     Marin's: train on the FineWeb-Edu 10B subcache (hf://datasets/marin-community/fineweb-edu-pretokenized-10B,
          a Levanter cache in Llama-3 ids, ~20 GB, mirrored once into data.cache_dir and read as-is), tokenizer
          stanford-crfm/marin-tokenizer, eval on Paloma c4_en val (allenai/paloma@65cd6fc, a gated HF dataset: accept
          its terms and `huggingface-cli login`) as eval/paloma/c4_en/bpb. `python -m tinyjax.data --config=...`
          fetches and builds everything ahead of a run; see README "Data".
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
  d = c.data  # Marin speedrun data (experiments/speedrun: fineweb_edu_subcache_10B + Paloma c4_en val)
  d.tokenizer = "stanford-crfm/marin-tokenizer"  # = Llama-3 ids (128,256); the 10B cache was built with them
  d.train_urls = ["hf://datasets/marin-community/fineweb-edu-pretokenized-10B/train"]  # prebuilt Levanter cache
  d.validation_urls = {"paloma/c4_en": ["hf://datasets/allenai/paloma@65cd6fc/c4_en/val/val*.jsonl.gz"]}
  return c
