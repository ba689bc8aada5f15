"""Builders that tests/test_export.py and tests/test_sample.py share (conftest.py exposes them as fixtures: tok,
make_run, write_checkpoint): a GQA model config, a tokenizer trained in milliseconds, parameters at unit scale, and a
run directory holding a real Orbax checkpoint."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from tinyjax import config, optim, weights
from tinyjax.step import init_state
from tinyjax.data import tokenizer as tokenizers
from tinyjax.model import ModelConfig, Transformer
from tinyjax.runtime import checkpoint

# GQA (4 query heads share 2 kv heads), fp32 compute so the parity bound is about the math, not bf16 rounding.
GQA = ModelConfig(hidden_dim=64, intermediate_dim=128, num_layers=2, num_heads=4, num_kv_heads=2, seq_len=32,
                  vocab_size=320, compute_dtype="float32")
TEXTS = ["The Python interpreter reads a line and runs it.", "A list comprehension builds a list from a loop.",
         "Functions are defined with def and return values.", "import os, sys; print(sys.path)"] * 4


def make_tokenizer(folder) -> tokenizers.Loaded:
  """The builtin tokenizer recipe (tokenizer.train_bpe: byte-level BPE, BOS=0, EOS=1, BOS post-processor), trained
  on a few lines so it takes milliseconds."""
  folder.mkdir(parents=True, exist_ok=True)
  (folder / "corpus.txt").write_text("\n".join(TEXTS) + "\n")
  tok = tokenizers.train_bpe([str(folder / "corpus.txt")], 300)
  (folder / "tokenizer.json").write_text(tok.to_str())
  return tokenizers.load(str(folder), str(folder), [], GQA.vocab_size)


def strong_params(c: ModelConfig, seed: int = 0) -> dict:
  """Random params at unit scale: Levanter's init gives near-zero logits, which would make any parity test vacuous."""
  model = Transformer(c, eos_id=1)
  shapes = model.init(jax.random.key(seed), jnp.zeros((1, 4), jnp.int32))["params"]
  leaves, tree = jax.tree.flatten(shapes)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  def draw(key, x):
    if x.ndim == 1:  # norm scales around 1
      return 1.0 + 0.2 * jax.random.normal(key, x.shape, x.dtype)
    return jax.random.normal(key, x.shape, x.dtype) * (1.0 if x.shape[0] == c.vocab_size else x.shape[0] ** -0.5)
  return jax.tree.unflatten(tree, [draw(k, x) for k, x in zip(keys, leaves)])


def tokens_without_eos(seed: int, shape) -> np.ndarray:
  return np.asarray(jax.random.randint(jax.random.key(seed), shape, 2, GQA.vocab_size), np.int32)


def make_run(tok, c=GQA, seed=0) -> weights.Run:
  return weights.Run("", 0, {}, c, strong_params(c, seed), tok)


def write_checkpoint(path, tok, c=GQA, step=5, tokenizer=None, cache_dir=None) -> dict:
  """A real run directory: an Orbax checkpoint of a full TrainState written by checkpoint.Checkpointer."""
  cfg = config.base()
  for f in dataclasses.fields(ModelConfig):
    cfg.model[f.name] = getattr(c, f.name)
  cfg.data.tokenizer, cfg.data.cache_dir = tokenizer or tok.path, cache_dir or str(path / "cache")
  cfg.train.num_train_steps = 10
  model = Transformer(c, eos_id=tok.eos_id)
  state = init_state(model, optim.make(cfg, 10), 0)
  params = strong_params(c)
  state = state.replace(params=params)
  ckpt = checkpoint.Checkpointer(str(path), cfg)
  ckpt.save(step, state, {})
  ckpt.close()
  return params
