"""The tests' one small config: d 32, 2 layers, seq 32, vocab 512, batch 8, 8 steps, evals and checkpoints every 4
steps (evals at 4 and 8, checkpoints 4 and 8), one device. In-process runs get it from conftest's `small_cfg` fixture
(on the session's token cache); CLI runs name this file: `python -m tinyjax.main --config=tests/small_config.py`
(conftest's `small_args`). Not a shipped config: a run of it takes ~2 s of a 2-core CPU once its step is compiled.
"""
from tinyjax import config


def get_config():
  c = config.base()
  m = c.model
  m.hidden_dim, m.intermediate_dim, m.num_layers, m.num_heads, m.num_kv_heads = 32, 64, 2, 2, 2
  m.seq_len, m.vocab_size = 32, 512
  t = c.train
  t.train_batch_size, t.num_train_steps, t.log_every, t.steps_per_eval, t.max_eval_batches = 8, 8, 1, 4, 1
  c.checkpoint.save_interval_steps, c.checkpoint.max_to_keep = 4, 3
  c.mesh.data = 1
  return c
