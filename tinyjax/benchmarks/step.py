"""Train-step speed in one process: tinyjax against a bare JAX peer, and the fused loss against the blockwise one.

python -m tinyjax.benchmarks.step [--suite peers|loss|all] [--rounds 3] [--steps 10]

peers (default): the peers' tiny shape (vocab 8192, d 256, 4 layers, 4 heads, seq 256, batch 8, fp32, AdamW lr 1e-3,
b1 0.9, b2 0.95, eps 1e-8, wd 0.1, no clipping), tinyjax's real train step against a bare jax.jit + optax.adamw
Llama of the same shape. Rounds alternate tinyjax / bare so that machine load hits both alike; the report is the
median tokens/s of each and their ratio (target >= 1.0). Both steps donate their state and feed the same random
batch. The bare model is written out here (~60 lines) as the peers wrote theirs: no document masking, no non-finite
guard, no logged norms.
loss: a head-dominated shape, c4_50m's model (llama_50m, vocab 128,256: the lm_head is 88% of its FLOPs) at
LOSS_BATCH x 1024 tokens, bf16 compute, Muon: the train step with model.loss_impl=fused against =blockwise (the
rematerialised scan), rounds interleaved (the order alternates), --loss_steps steps per round; medians of the
seconds per step and their ratio, each round's ratio (its two runs are neighbours in time, so drifting load cancels
better) and their median, and each step's compiled memory.
Both suites print the FLOP audit (tinyjax/audit.py) of the tinyjax steps they time.
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
import types

import jax
import jax.numpy as jnp
import optax

from tinyjax import audit, config, sharding, step

V, D, LAYERS, HEADS, F, L, B = 8192, 256, 4, 4, 768, 256, 8
LOSS_BATCH = 4  # rows of 1024 tokens in the loss suite: c4_50m's model at a small per-device batch
ONE_DEVICE = types.SimpleNamespace(data=1)  # a mesh config: one device


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


def loss_config(loss_impl: str):
  """c4_50m's model and optimizer family (llama_50m, Muon, bf16 compute) at LOSS_BATCH rows: a head-dominated step."""
  cfg = config.base()
  config.marin_model(cfg, "llama_50m")
  cfg.model.loss_impl = loss_impl
  cfg.train.train_batch_size, cfg.train.num_train_steps = LOSS_BATCH, 1000
  return cfg


def tinyjax_step(cfg=None):
  """(step, state, compiled plan info) exactly as train.run builds them (one device)."""
  cfg = cfg or tinyjax_config()
  built = step.build(cfg, sharding.make_mesh(ONE_DEVICE), eos_id=1)
  train_step, info = step.compile_for_device(built, cfg)
  return train_step, built.init(), info


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
  """(seconds per step over `steps` steps after one warm step, the state)."""
  state, out = step(state, tokens)  # warm (compiles on the first round)
  jax.block_until_ready(out)
  t = time.perf_counter()
  for _ in range(steps):
    state, out = step(state, tokens)
  jax.block_until_ready((state, out))
  return (time.perf_counter() - t) / steps, state


def audit_of(cfg) -> dict:
  return audit.flop_audit(cfg, sharding.make_mesh(ONE_DEVICE))


def peers(rounds: int, steps: int) -> dict:
  tokens = jax.random.randint(jax.random.key(1), (B, L), 0, V, jnp.int32)
  (tj, tj_state, _), (bare, bare_state) = tinyjax_step(), bare_step()
  rates = {"tinyjax": [], "bare": []}
  for _ in range(rounds):
    seconds, tj_state = _time(tj, tj_state, tokens, steps)
    rates["tinyjax"].append(B * L / seconds)
    seconds, bare_state = _time(bare, bare_state, tokens, steps)
    rates["bare"].append(B * L / seconds)
  med = {k: statistics.median(v) for k, v in rates.items()}
  shape = dict(V=V, D=D, layers=LAYERS, heads=HEADS, F=F, L=L, B=B)
  return {"tokens_per_second": rates, "median": med, "ratio": med["tinyjax"] / med["bare"], "shape": shape,
          "flop_audit": audit_of(tinyjax_config())}


def loss(rounds: int, steps: int) -> dict:
  """Seconds per step of the fused and the blockwise loss on the head-dominated shape, rounds interleaved."""
  impls = ("fused", "blockwise")
  cfgs = {impl: loss_config(impl) for impl in impls}
  runs = {impl: tinyjax_step(cfgs[impl]) for impl in impls}
  states = {impl: runs[impl][1] for impl in impls}
  tokens = jax.random.randint(jax.random.key(1), (LOSS_BATCH, cfgs["fused"].model.seq_len), 0,
                              cfgs["fused"].model.vocab_size, jnp.int32)
  seconds = {impl: [] for impl in impls}
  for r in range(rounds):
    for impl in impls if r % 2 == 0 else impls[::-1]:  # alternate the order: drifting load hits both alike
      s, states[impl] = _time(runs[impl][0], states[impl], tokens, steps)
      seconds[impl].append(s)
  med = {impl: statistics.median(v) for impl, v in seconds.items()}
  paired = [b / f for f, b in zip(seconds["fused"], seconds["blockwise"])]  # each round's two runs are neighbours
  return {"seconds_per_step": seconds, "median": med, "blockwise_over_fused": med["blockwise"] / med["fused"],
          "blockwise_over_fused_per_round": paired, "median_of_round_ratios": statistics.median(paired),
          "shape": {"model": "llama_50m", "batch": LOSS_BATCH, "seq_len": cfgs["fused"].model.seq_len},
          "compiled_gib": {impl: runs[impl][2].get("compiled_gib") for impl in impls},
          "flop_audit": {impl: audit_of(cfgs[impl]) for impl in impls}}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--suite", choices=("peers", "loss", "all"), default="peers")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--steps", type=int, default=10, help="timed steps per round (peers)")
  parser.add_argument("--loss_steps", type=int, default=2, help="timed steps per round (loss; ~10 s each on CPU)")
  args = parser.parse_args()
  out = {"backend": jax.default_backend()}
  if args.suite in ("peers", "all"):
    out["peers"] = peers(args.rounds, args.steps)
  if args.suite in ("loss", "all"):
    out["loss"] = loss(args.rounds, args.loss_steps)
  print(json.dumps(out, indent=2))


if __name__ == "__main__":
  main()
