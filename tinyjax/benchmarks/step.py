"""tinyjax's real train step against a bare jax.jit + optax.adamw Llama of the same shape, in one process.

python -m tinyjax.benchmarks.step [--rounds 3] [--steps 10]

The peers' tiny shape: vocab 8192, d 256, 4 layers, 4 heads, seq 256, batch 8, fp32, AdamW lr 1e-3, b1 0.9,
b2 0.95, eps 1e-8, wd 0.1, no clipping. Rounds alternate tinyjax / bare so that machine load hits both alike; the
report is the median tokens/s of each and their ratio (target >= 1.0). Both steps donate their state and feed the
same random batch. The bare model is written out here (~60 lines) as the peers wrote theirs: no document masking,
no non-finite guard, no logged norms.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import statistics
import time

import jax
import jax.numpy as jnp
import optax

from tinyjax import config, optim, sharding, train
from tinyjax.model import ModelConfig, Transformer

V, D, LAYERS, HEADS, F, L, B = 8192, 256, 4, 4, 768, 256, 8


def tinyjax_config():
  cfg = config.base()
  config.adamw_defaults(cfg)
  m = cfg.model
  m.vocab_size, m.hidden_dim, m.num_layers, m.num_heads, m.num_kv_heads = V, D, LAYERS, HEADS, HEADS
  m.intermediate_dim, m.seq_len, m.compute_dtype = F, L, "float32"
  o = cfg.optimizer
  o.learning_rate, o.beta1, o.beta2, o.epsilon, o.weight_decay, o.max_grad_norm = 1e-3, 0.9, 0.95, 1e-8, 0.1, 0.0
  o.warmup, o.lr_schedule = 0.0, "constant"
  cfg.train.train_batch_size, cfg.train.num_train_steps = B, 1000
  return cfg


def tinyjax_step():
  """(step, state) exactly as train.run builds them (one device)."""
  cfg = tinyjax_config()
  model = Transformer(ModelConfig.from_config(cfg.model), eos_id=1)
  tx = optim.make(cfg, cfg.train.num_train_steps)
  init = lambda: train.init_state(model, tx, 0)
  mesh = sharding.make_mesh(dataclasses.make_dataclass("M", [("data", int)])(1))
  state_sh = sharding.state_shardings(jax.eval_shape(init), mesh, False)
  step, _ = train.compile_step(cfg, model, tx, 1000, jax.eval_shape(init), state_sh, sharding.batch_sharding(mesh))
  return step, jax.jit(init, out_shardings=state_sh)()


# ---- the bare reference ---------------------------------------------------------------------------------------

def _rms(x, w):
  return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-5) * w


def _rope_tables(K):
  freqs = jnp.arange(L)[:, None] / 10000.0 ** (jnp.arange(0, K, 2) / K)
  return jnp.cos(jnp.concatenate([freqs] * 2, -1))[:, None], jnp.sin(jnp.concatenate([freqs] * 2, -1))[:, None]


def _rope(x, cos, sin):
  x1, x2 = jnp.split(x, 2, -1)
  return x * cos + jnp.concatenate([-x2, x1], -1) * sin


def bare_params(key):
  ks = iter(jax.random.split(key, 4 + 7 * LAYERS))
  n = lambda shape, fan_in: jax.random.normal(next(ks), shape) / fan_in ** 0.5
  layer = lambda: {"q": n((D, D), D), "k": n((D, D), D), "v": n((D, D), D), "o": n((D, D), D), "gate": n((D, F), D),
                   "up": n((D, F), D), "down": n((F, D), F), "n1": jnp.ones(D), "n2": jnp.ones(D)}
  return {"emb": n((V, D), D), "head": n((D, V), D), "norm": jnp.ones(D), "layers": [layer() for _ in range(LAYERS)]}


def bare_loss(p, tokens):
  x = p["emb"][tokens]
  cos, sin = _rope_tables(D // HEADS)  # computed once per step, shared by every layer
  for lp in p["layers"]:
    h = _rms(x, lp["n1"])
    q, k, v = ((h @ lp[w]).reshape(B, L, HEADS, D // HEADS) for w in "qkv")
    q, k = _rope(q, cos, sin), _rope(k, cos, sin)
    x = x + jax.nn.dot_product_attention(q, k, v, is_causal=True).reshape(B, L, D) @ lp["o"]
    h = _rms(x, lp["n2"])
    x = x + (jax.nn.silu(h @ lp["gate"]) * (h @ lp["up"])) @ lp["down"]
  logits = _rms(x, p["norm"]) @ p["head"]
  return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()


def bare_step():
  tx = optax.adamw(1e-3, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1)
  params = bare_params(jax.random.key(0))

  @functools.partial(jax.jit, donate_argnums=0)
  def step(state, tokens):
    p, s = state
    loss, g = jax.value_and_grad(bare_loss)(p, tokens)
    u, s = tx.update(g, s, p)
    return (optax.apply_updates(p, u), s), {"loss": loss}
  return step, (params, tx.init(params))


def _time(step, state, tokens, steps: int) -> tuple[float, object]:
  state, out = step(state, tokens)  # warm (compiles on the first round)
  jax.block_until_ready(out)
  t = time.perf_counter()
  for _ in range(steps):
    state, out = step(state, tokens)
  jax.block_until_ready((state, out))
  return B * L * steps / (time.perf_counter() - t), state


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--steps", type=int, default=10)
  args = parser.parse_args()
  tokens = jax.random.randint(jax.random.key(1), (B, L), 0, V, jnp.int32)
  (tj, tj_state), (bare, bare_state) = tinyjax_step(), bare_step()
  rates = {"tinyjax": [], "bare": []}
  for _ in range(args.rounds):
    rate, tj_state = _time(tj, tj_state, tokens, args.steps)
    rates["tinyjax"].append(rate)
    rate, bare_state = _time(bare, bare_state, tokens, args.steps)
    rates["bare"].append(rate)
  med = {k: statistics.median(v) for k, v in rates.items()}
  shape = dict(V=V, D=D, layers=LAYERS, heads=HEADS, F=F, L=L, B=B)
  print(json.dumps({"tokens_per_second": rates, "median": med, "ratio": med["tinyjax"] / med["bare"], "shape": shape,
                    "backend": jax.default_backend()}, indent=2))


if __name__ == "__main__":
  main()
