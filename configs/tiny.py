"""The built-in default: a llama_30m-shaped body (d 128, 4 layers) on the offline Python-docs corpus, on a CPU.

COMMAND:  python -m tinyjax.main --config=configs/tiny.py --workdir=workdir/tiny
HARDWARE: a 2-core CPU (no GPU, no network): about 4-5 minutes on the project machine, including the one-off corpus,
          tokenizer and cache build and the two samples printed at the end (5m54s with the pip install, cold).
EXPECTED: train loss 8.79 at step 1 (ln 4096 + ~0.5 from Levanter's init) falling to ~3.6-4.0 by step 500;
          eval/python_docs/bpb ~2.33 at step 100 and ~1.86 at step 500 (see BUILD_NOTES.md). Same model, optimizer
          and metric code as the c4_*.py configs.
"""
from tinyjax import config


def get_config():
  c = config.base()
  m = c.model  # llama_30m's body with a 4,096-token BPE vocabulary and short windows, to fit a laptop CPU
  m.hidden_dim, m.intermediate_dim, m.num_layers, m.num_heads, m.num_kv_heads = 128, 448, 4, 2, 2
  m.seq_len, m.vocab_size = 128, 4096
  t = c.train
  t.train_batch_size, t.num_train_steps = 16, 500
  t.steps_per_eval, t.log_every, t.max_eval_batches = 100, 20, 8
  t.sample_prompts = ("The Python interpreter", "A list comprehension")  # printed at the end (samples.json)
  config.muon_speedrun(c, 0.02, 0.004, warmup=0.05)  # llama_50m_muon_1x's recipe + a 5% warmup (small-model Muon)
  return c
