"""Text generation from a run's checkpoint: a jitted KV-cache decoder over the raw param tree (the same math as
model.Transformer), batched left-padded prompts, temperature / top-k / top-p sampling, stopping at EOS.

  python -m tinyjax.sample WORKDIR --prompt "..." [--prompt "..."] [--max_new_tokens N --temperature T
                           --top_k K --top_p P --seed S --num_samples M --step N --cache_dir DIR]

Prompts are encoded as the exported tokenizer encodes them (tokenizer.json with add_special_tokens: BOS from its
post-processor, no EOS), so transformers' AutoTokenizer gives the same ids. Padding: prompts are left-padded to one
length; pad slots are masked out as keys and positions count real tokens only, so a padded prompt decodes exactly as
it would alone. Attention also keeps model.py's EOS document mask, so cached logits equal Transformer's.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from tinyjax import cli, config, weights
from tinyjax.errors import ConfigError
from tinyjax.model import ModelConfig, rms_norm, rope

# Fixed prompts of the end-of-run samples: the tiny default trains on Python's documentation.
SAMPLE_PROMPTS = ("The Python interpreter", "A list comprehension")
SAMPLES_FILE = "samples.json"


def init_cache(c: ModelConfig, batch: int, length: int) -> dict:
  """Empty cache of `length` slots: k/v per layer, each slot's document id and whether it holds a real token."""
  kv = jnp.zeros((c.num_layers, batch, length, c.num_kv_heads, c.head_dim), c.compute_dtype)
  return {"k": kv, "v": kv, "seg": jnp.zeros((batch, length), jnp.int32),
          "valid": jnp.zeros((batch, length), bool)}


def _dense(x, kernel, dtype):
  return jnp.dot(x.astype(dtype), kernel.astype(dtype))  # what nn.Dense(dtype=compute_dtype) computes


def _attend(q_BTGRK, k_BSGK, v_BSGK, mask_BTS):
  """model.py's reference attention against the cache: fp32 scores / sqrt(K), masked softmax."""
  scores = jnp.einsum("btgrk,bsgk->bgrts", q_BTGRK, k_BSGK,
                      preferred_element_type=jnp.float32) / math.sqrt(q_BTGRK.shape[-1])
  scores = jnp.where(mask_BTS[:, None, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v_BSGK.dtype)
  return jnp.einsum("bgrts,bsgk->btgrk", probs, v_BSGK)


def forward(params, c: ModelConfig, tokens_BT, pos_BT, seg_BT, valid_BT, cache: dict, start, last_only=False):
  """Runs T new tokens written at cache slots start..start+T-1 -> (logits float32[B, T, V], cache); last_only: the
  last position's logits only ([B, 1, V]: a prefill never materialises [B, P, V]).

  A query at slot s sees slots <= s that hold real tokens of its own document."""
  dt, eps = c.compute_dtype, c.layer_norm_epsilon
  B, T = tokens_BT.shape
  H, G, K = c.num_heads, c.num_kv_heads, c.head_dim
  put = lambda buf, new: jax.lax.dynamic_update_slice_in_dim(buf, new, start, axis=1)
  cache = {**cache, "seg": put(cache["seg"], seg_BT), "valid": put(cache["valid"], valid_BT)}
  S = cache["valid"].shape[1]
  causal_TS = jnp.arange(S)[None, :] <= start + jnp.arange(T)[:, None]
  mask_BTS = causal_TS[None] & cache["valid"][:, None, :] & (cache["seg"][:, None, :] == seg_BT[:, :, None])
  x = jnp.take(params["embed_tokens"]["embedding"].astype(dt), tokens_BT, axis=0)
  k_cache, v_cache = cache["k"], cache["v"]
  for i in range(c.num_layers):
    p = params[f"layers_{i}"]
    a = p["self_attn"]
    h = rms_norm(x, p["input_layernorm"]["scale"], eps, dt)
    q = _dense(h, a["q_proj"]["kernel"], dt).reshape(B, T, H, K)
    k = _dense(h, a["k_proj"]["kernel"], dt).reshape(B, T, G, K)
    v = _dense(h, a["v_proj"]["kernel"], dt).reshape(B, T, G, K)
    if c.use_qk_norm:
      q, k = rms_norm(q, a["q_norm"]["scale"], eps, dt), rms_norm(k, a["k_norm"]["scale"], eps, dt)
    q, k = rope(q, c.rope_theta, pos_BT), rope(k, c.rope_theta, pos_BT)
    # In-place writes into the [layers, B, S, G, K] buffers (XLA updates a while-loop carry without copying it).
    k_cache = jax.lax.dynamic_update_slice(k_cache, k[None].astype(k_cache.dtype), (i, 0, start, 0, 0))
    v_cache = jax.lax.dynamic_update_slice(v_cache, v[None].astype(v_cache.dtype), (i, 0, start, 0, 0))
    out = _attend(q.reshape(B, T, G, H // G, K), k_cache[i], v_cache[i], mask_BTS)
    x = x + _dense(out.reshape(B, T, H * K), a["o_proj"]["kernel"], dt)
    h = rms_norm(x, p["post_attention_layernorm"]["scale"], eps, dt)
    m = p["mlp"]
    up = jax.nn.silu(_dense(h, m["gate_proj"]["kernel"], dt)) * _dense(h, m["up_proj"]["kernel"], dt)
    x = x + _dense(up, m["down_proj"]["kernel"], dt)
  x = rms_norm(x[:, -1:] if last_only else x, params["norm"]["scale"], eps, dt)
  head = params["embed_tokens"]["embedding"].T if c.tie_word_embeddings else params["lm_head"]["kernel"]
  logits = jnp.dot(x, head.astype(dt)).astype(jnp.float32)
  return logits, {**cache, "k": k_cache, "v": v_cache}


def prompt_layout(valid_BP, tokens_BP, eos_id: int):
  """(positions, document ids) of left-padded prompts: positions count real tokens; a document starts after EOS."""
  pos_BP = jnp.maximum(jnp.cumsum(valid_BP.astype(jnp.int32), axis=1) - 1, 0)
  after_eos = (tokens_BP == eos_id) & valid_BP
  seg_BP = jnp.cumsum(jnp.pad(after_eos[:, :-1], ((0, 0), (1, 0))).astype(jnp.int32), axis=1)
  return pos_BP, seg_BP


def filter_logits(logits_BV, top_k: int, top_p: float):
  """-inf outside the top_k largest (0 = off) and outside the smallest set holding top_p of the mass (1 = off)."""
  if top_k > 0:
    kth = jax.lax.top_k(logits_BV, min(top_k, logits_BV.shape[-1]))[0][:, -1:]
    logits_BV = jnp.where(logits_BV < kth, -jnp.inf, logits_BV)
  if top_p < 1.0:
    sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV  # mass of strictly more likely tokens
    threshold = jnp.min(jnp.where(before_BV < top_p, sorted_BV, jnp.inf), axis=-1, keepdims=True)
    logits_BV = jnp.where(logits_BV < threshold, -jnp.inf, logits_BV)
  return logits_BV


@functools.partial(jax.jit, static_argnames=("c", "eos_id", "max_new_tokens", "temperature", "top_k", "top_p"))
def generate(params, tokens_BP, valid_BP, key, *, c: ModelConfig, eos_id: int, max_new_tokens: int,
             temperature: float, top_k: int = 0, top_p: float = 1.0):
  """Left-padded prompts -> (new tokens int32[B, N], number of new tokens before EOS int32[B]).

  temperature 0 is greedy (argmax); rows that reached EOS are padded with EOS and the loop ends when all have."""
  B, P = tokens_BP.shape
  pos_BP, seg_BP = prompt_layout(valid_BP, tokens_BP, eos_id)
  logits, cache = forward(params, c, tokens_BP, pos_BP, seg_BP, valid_BP, init_cache(c, B, P + max_new_tokens), 0,
                          last_only=True)
  state = (0, cache, logits[:, -1], key, jnp.full((B, max_new_tokens), eos_id, jnp.int32),
           jnp.zeros(B, bool), pos_BP[:, -1] + 1, seg_BP[:, -1], jnp.full(B, max_new_tokens, jnp.int32))

  def body(state):
    t, cache, logits_BV, key, out_BN, done_B, pos_B, seg_B, length_B = state
    key, sub = jax.random.split(key)
    if temperature == 0:
      tok_B = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    else:
      tok_B = jax.random.categorical(sub, filter_logits(logits_BV / temperature, top_k, top_p)).astype(jnp.int32)
    tok_B = jnp.where(done_B, eos_id, tok_B)
    length_B = jnp.where(~done_B & (tok_B == eos_id), t, length_B)
    out_BN = out_BN.at[:, t].set(tok_B)
    logits, cache = forward(params, c, tok_B[:, None], pos_B[:, None], seg_B[:, None], jnp.ones((B, 1), bool),
                            cache, P + t)
    return t + 1, cache, logits[:, 0], key, out_BN, done_B | (tok_B == eos_id), pos_B + 1, seg_B, length_B

  cond = lambda state: (state[0] < max_new_tokens) & ~jnp.all(state[5])
  state = jax.lax.while_loop(cond, body, state)
  return state[4], state[8]


def encode_prompts(tok, prompts: list[str]) -> tuple[np.ndarray, np.ndarray, list[list[int]]]:
  """Prompts -> left-padded ids int32[B, P], valid mask bool[B, P], and each prompt's ids."""
  ids = [e.ids for e in tok.tokenizer.encode_batch(list(prompts), add_special_tokens=True)]
  P = max(1, max(len(i) for i in ids))
  tokens, valid = np.zeros((len(ids), P), np.int32), np.zeros((len(ids), P), bool)
  for row, i in enumerate(ids):
    if i:
      tokens[row, P - len(i):], valid[row, P - len(i):] = i, True
  return tokens, valid, ids


def sample(run: weights.Run, prompts: list[str], max_new_tokens: int = 64, temperature: float = 0.8,
           top_k: int = 0, top_p: float = 1.0, seed: int = 0, num_samples: int = 1) -> list[dict]:
  """num_samples completions of each prompt: [{prompt, sample, completion, text, ids, stopped_at_eos}]."""
  c, tok = run.model_cfg, run.tok
  tokens, valid, ids = encode_prompts(tok, [p for p in prompts for _ in range(num_samples)])
  if tokens.shape[1] + max_new_tokens > c.seq_len:
    raise ConfigError(f"--max_new_tokens={max_new_tokens}: the longest prompt ({tokens.shape[1]} tokens) plus the new "
                      f"tokens exceeds the model's seq_len {c.seq_len} (the positions it was trained on)")
  new, lengths = generate(run.params, tokens, valid, jax.random.key(seed), c=c, eos_id=tok.eos_id,
                          max_new_tokens=max_new_tokens, temperature=float(temperature), top_k=top_k,
                          top_p=float(top_p))
  new, lengths = np.asarray(new), np.asarray(lengths)
  out = []
  for row, prompt_ids in enumerate(ids):
    completion = new[row, :lengths[row]].tolist()
    out.append({"prompt": prompts[row // num_samples], "sample": row % num_samples,
                "completion": tok.tokenizer.decode(completion, skip_special_tokens=True),
                "text": tok.tokenizer.decode(prompt_ids + completion, skip_special_tokens=True),
                "ids": prompt_ids + completion, "stopped_at_eos": bool(lengths[row] < max_new_tokens)})
  return out


def samples_after_training(workdir: str, prompts=SAMPLE_PROMPTS, max_new_tokens: int = 40, temperature: float = 0.8,
                           top_k: int = 40, seed: int = 0) -> list[dict]:
  """Prints one short sample per fixed prompt from workdir's newest checkpoint and writes them to
  workdir/samples.json (process 0 only); [] with a note if the run kept no checkpoint."""
  try:
    run = weights.load_run(workdir)
  except ConfigError as e:
    print(f"samples: skipped ({e})", flush=True)
    return []
  n = min(max_new_tokens, run.model_cfg.seq_len - max(len(i) for i in encode_prompts(run.tok, list(prompts))[2]))
  out = sample(run, list(prompts), n, temperature, top_k, 1.0, seed)
  if jax.process_index() == 0:
    from tinyjax.runtime import workdir as workdirs  # noqa: PLC0415
    remote = workdirs.is_remote(workdir)
    if remote:
      import fsspec  # noqa: PLC0415
    opener = fsspec.open if remote else open  # gs:// workdirs: written to the bucket directly
    with opener(f"{workdir.rstrip('/')}/{SAMPLES_FILE}" if remote else os.path.join(workdir, SAMPLES_FILE), "w",
                encoding="utf-8") as f:
      json.dump({"step": run.step, "temperature": temperature, "top_k": top_k, "seed": seed, "samples": out}, f,
                indent=2)
  for s in out:
    print(f"sample (step {run.step}): {s['text']!r}", flush=True)
  return out


def main(argv: list[str] | None = None) -> None:
  parser = cli.ArgParser(prog="python -m tinyjax.sample", description=cli.summary(__doc__))
  parser.add_argument("workdir", help="a tinyjax run directory (holds checkpoints/)")
  parser.add_argument("--prompt", action="append", help="prompt text (repeat for a batch); default: two fixed ones")
  parser.add_argument("--max_new_tokens", type=int, default=64)
  parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (argmax)")
  parser.add_argument("--top_k", type=int, default=0, help="sample among the k most likely tokens; 0 = all")
  parser.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling mass; 1 = off")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--num_samples", type=int, default=1, help="samples per prompt")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
  parser.add_argument("--json", action="store_true", help="print the samples as JSON")
  parser.add_argument("--cache_dir", default=None, help="where the run's tokenizer is (default: the run's "
                      "data.cache_dir)")
  parser.add_argument("--compute_dtype", choices=config.DTYPES, default=None,
                      help="matmul dtype (default: the run's model.compute_dtype); float32 to compare with HF fp32")
  a = parser.parse_args(argv)
  rules = {"max_new_tokens": (a.max_new_tokens > 0, "> 0"), "temperature": (a.temperature >= 0, ">= 0"),
           "top_k": (a.top_k >= 0, ">= 0"), "top_p": (0 < a.top_p <= 1, "in (0, 1]"),
           "num_samples": (a.num_samples > 0, "> 0")}
  for name, (ok, allowed) in rules.items():
    if not ok:
      cli.fail(f"--{name}={getattr(a, name)} is invalid: must be {allowed}")
  try:
    run = weights.load_run(a.workdir, a.step, a.cache_dir)
    if a.compute_dtype:
      run = dataclasses.replace(run, model_cfg=dataclasses.replace(run.model_cfg, compute_dtype=a.compute_dtype))
    out = sample(run, a.prompt or list(SAMPLE_PROMPTS), a.max_new_tokens, a.temperature, a.top_k, a.top_p,
                 a.seed, a.num_samples)
  except ConfigError as e:
    cli.fail(str(e))
  if a.json:
    print(json.dumps(out, indent=2))
    return
  for s in out:
    eos = " <EOS>" if s["stopped_at_eos"] else ""
    print(f"--- step {run.step} | prompt {s['prompt']!r} | sample {s['sample']} ---\n{s['text']}{eos}")


if __name__ == "__main__":
  main(sys.argv[1:])
