"""Fixtures of the kernel tests: kernel_cfg(**model_keys), the kernels' small model (d 32, 2 layers, 4 query heads over
2 kv heads, seq 64, vocab 384, fp32, batch 4) with model keys overridden."""
import pytest

from tinyjax import config


def _kernel_cfg(**model):
  cfg = config.base()
  m = cfg.model
  m.hidden_dim, m.intermediate_dim, m.num_layers, m.num_heads, m.num_kv_heads = 32, 64, 2, 4, 2
  m.seq_len, m.vocab_size, m.compute_dtype = 64, 384, "float32"
  for key, value in model.items():
    m[key] = value
  cfg.train.train_batch_size, cfg.train.num_train_steps = 4, 10
  return cfg


@pytest.fixture(scope="session")
def kernel_cfg():
  return _kernel_cfg
