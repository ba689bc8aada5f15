"""Marin's "130m" (llama_150m at seq 4096) + Muon at 1x Chinchilla: mirrors `muon_llama_scaling/130m`.

COMMAND:  python -m tinyjax.main --config=configs/c4_130m.py --workdir=runs/c4_130m
DRY RUN:  python -m tinyjax.main --config=configs/c4_130m.py --dry_run
HARDWARE: Marin used a TPU v5p-32 (16 chips, 1,205 s); on GPUs, 8xH100 or more (or grad_accum_steps on fewer).
EXPECTED: model_size 154,147,328; 4,959 steps x 128 x 4096 = 2,599,944,192 tokens; model_flops 1.78e18;
          Marin's result: eval/paloma/c4_en/bpb = 1.16984.
DATA:     Marin's: train on the FineWeb-Edu 10B subcache (hf://datasets/marin-community/fineweb-edu-pretokenized-10B,
          a Levanter cache in Llama-3 ids, ~20 GB, mirrored once into data.cache_dir and read as-is), tokenizer
          stanford-crfm/marin-tokenizer, eval on Paloma c4_en val (allenai/paloma@65cd6fc, a gated HF dataset: accept
          its terms and `huggingface-cli login`) as eval/paloma/c4_en/bpb. `python -m tinyjax.data --config=...`
          fetches and builds everything ahead of a run; see README "Data".
"""
from tinyjax import config


def get_config():
  c = config.base()
  config.marin_model(c, "llama_150m")
  c.model.seq_len = 4096  # the scaling sweeps replace llama_150m's 1024 by 4096
  c.train.train_batch_size = 128
  c.train.chinchilla_multiple = 1.0  # 20 * 130e6 // (128 * 4096) = 4,959 steps
  c.train.nominal_params = 130_000_000
  c.train.plan_num_devices = 16  # --dry_run plans for Marin's v5p-32 (16 chips: 8 x 4096 tokens per chip)
  o = c.optimizer  # experiments/speedrun/muon_llama_scaling/muon_sweep.py ("Fantastic Optimizers" presets)
  o.name = "muon"
  o.learning_rate, o.adam_lr = 0.016, 0.0032
  o.momentum, o.nesterov = 0.95, True
  o.beta1, o.beta2, o.epsilon, o.muon_epsilon = 0.8, 0.98, 1e-15, 1e-5
  o.weight_decay, o.max_grad_norm = 0.1, 1.0
  o.warmup, o.decay, o.min_lr_ratio, o.lr_schedule = 0.0, 0.8, 0.0, "linear"
  o.coefficient_type = "simple"
  d = c.data  # Marin speedrun data (experiments/speedrun: fineweb_edu_subcache_10B + Paloma c4_en val)
  d.tokenizer = "stanford-crfm/marin-tokenizer"  # = Llama-3 ids (128,256); the 10B cache was built with them
  d.train_urls = ["hf://datasets/marin-community/fineweb-edu-pretokenized-10B/train"]  # prebuilt Levanter cache
  d.validation_urls = {"paloma/c4_en": ["hf://datasets/allenai/paloma@65cd6fc/c4_en/val/val*.jsonl.gz"]}
  return c
