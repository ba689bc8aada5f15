"""Generation: KV-cache logits equal Transformer's full recompute, greedy decoding equals uncached argmax decoding,
left-padded batches decode as each prompt alone, top-k/top-p filtering, EOS stopping, and the CLI."""
import dataclasses
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import export_support

from tinyjax import sample
from tinyjax.model import Transformer


GQA = export_support.GQA
tokens_without_eos = export_support.tokens_without_eos


@pytest.fixture(scope="module")
def run(tok, make_run):
  return make_run(tok, seed=5)


def cached_logits(run, tokens_BL, prefill: int):
  """Logits of every position: the first `prefill` tokens in one call, then one token per call through the cache."""
  c, eos = run.model_cfg, run.tok.eos_id
  B, L = tokens_BL.shape
  valid = jnp.ones((B, L), bool)
  pos, seg = sample.prompt_layout(valid, tokens_BL, eos)
  cache = sample.init_cache(c, B, L)
  forward = jax.jit(sample.forward, static_argnums=1)
  out, cache = forward(run.params, c, tokens_BL[:, :prefill], pos[:, :prefill], seg[:, :prefill],
                              valid[:, :prefill], cache, 0)
  outs = [out]
  for t in range(prefill, L):
    out, cache = forward(run.params, c, tokens_BL[:, t:t + 1], pos[:, t:t + 1], seg[:, t:t + 1],
                                valid[:, t:t + 1], cache, t)
    outs.append(out)
  return np.concatenate(outs, axis=1)


@pytest.mark.slow
def test_kv_cache_logits_equal_full_recompute(run):
  tokens = jnp.asarray(tokens_without_eos(1, (2, 20)))
  tokens = tokens.at[0, 9].set(run.tok.eos_id)  # a document boundary: the cache keeps model.py's EOS mask
  full = np.asarray(Transformer(GQA, eos_id=run.tok.eos_id).apply({"params": run.params}, tokens))
  np.testing.assert_allclose(cached_logits(run, tokens, prefill=6), full, atol=2e-5, rtol=0)
  assert full.std() > 0.5


def uncached_greedy(run, prompt_ids, n):
  """Argmax decoding that recomputes the whole sequence with Transformer each step (no cache), stopping at EOS.
  The sequence is right-padded to seq_len (one compile): causal attention keeps the padding out of earlier logits."""
  model, ids = Transformer(GQA, eos_id=run.tok.eos_id), list(prompt_ids)
  logits_fn = jax.jit(lambda tokens: model.apply({"params": run.params}, tokens))
  for _ in range(n):
    padded = np.full((1, GQA.seq_len), 2, np.int32)
    padded[0, :len(ids)] = ids
    nxt = int(np.argmax(logits_fn(padded)[0, len(ids) - 1]))
    ids.append(nxt)
    if nxt == run.tok.eos_id:
      break
  return ids[len(prompt_ids):]


@pytest.mark.slow
def test_temperature_zero_equals_uncached_argmax_and_padding_is_invisible(run):
  prompts = ["The Python interpreter reads", "A list", "import os"]
  batch = sample.sample(run, prompts, max_new_tokens=12, temperature=0.0)
  for prompt, got in zip(prompts, batch):
    alone = sample.sample(run, [prompt], max_new_tokens=12, temperature=0.0)[0]
    assert got["ids"] == alone["ids"], "left padding changed a prompt's greedy continuation"
    prompt_ids = run.tok.tokenizer.encode(prompt, add_special_tokens=True).ids
    new = got["ids"][len(prompt_ids):]
    assert got["ids"][:len(prompt_ids)] == prompt_ids and prompt_ids[0] == run.tok.bos_id
    assert new == [t for t in uncached_greedy(run, prompt_ids, 12) if t != run.tok.eos_id]
  lengths = {len(run.tok.tokenizer.encode(p).ids) for p in prompts}
  assert len(lengths) == 3, "the prompts must differ in length for the padding check to mean anything"


@pytest.mark.slow
def test_sampling_is_seeded_and_top_k_one_is_greedy(run):
  greedy = sample.sample(run, ["A list"], max_new_tokens=10, temperature=0.0)[0]["ids"]
  assert sample.sample(run, ["A list"], max_new_tokens=10, temperature=1.5, top_k=1, seed=3)[0]["ids"] == greedy
  a = sample.sample(run, ["A list"], max_new_tokens=10, temperature=1.0, seed=1, num_samples=3)
  b = sample.sample(run, ["A list"], max_new_tokens=10, temperature=1.0, seed=1, num_samples=3)
  assert [s["ids"] for s in a] == [s["ids"] for s in b], "same seed, same samples"
  assert len({tuple(s["ids"]) for s in a}) > 1, "independent samples per row at temperature 1"
  assert [s["sample"] for s in a] == [0, 1, 2]


def test_filter_logits_top_k_and_top_p():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  keep = lambda k, p: np.isfinite(np.asarray(sample.filter_logits(logits, k, p)))[0].tolist()
  assert keep(2, 1.0) == [True, True, False, False]
  assert keep(0, 0.5) == [True, False, False, False]  # 0.5 alone reaches p
  assert keep(0, 0.7) == [True, True, False, False]  # 0.5 < 0.7 <= 0.8
  assert keep(0, 0.96) == [True, True, True, True]
  assert keep(0, 1.0) == [True, True, True, True]


@pytest.mark.slow
def test_stops_at_eos_as_uncached_decoding_does(tok, make_run):
  run = make_run(tok, seed=5)
  prompt_ids = run.tok.tokenizer.encode("A list").ids
  g = uncached_greedy(run, prompt_ids, 3)[2]  # the third greedy token
  head = np.asarray(run.params["lm_head"]["kernel"]).copy()
  head[:, run.tok.eos_id] = 1.01 * head[:, g]  # EOS now outscores g wherever g's logit is positive
  run = dataclasses.replace(run, params={**run.params, "lm_head": {"kernel": jnp.asarray(head)}})
  ref = uncached_greedy(run, prompt_ids, 8)
  assert ref[-1] == run.tok.eos_id and len(ref) <= 3
  out = sample.sample(run, ["A list"], max_new_tokens=8, temperature=0.0)[0]
  assert out["stopped_at_eos"] and out["ids"] == prompt_ids + ref[:-1], "EOS ends the sample and is not in it"
  tokens, valid, _ = sample.encode_prompts(run.tok, ["A list", "A list"])
  new, lengths = sample.generate(run.params, tokens, valid, jax.random.key(0), c=GQA, eos_id=run.tok.eos_id,
                                 max_new_tokens=8, temperature=0.0)
  assert np.asarray(lengths).tolist() == [len(ref) - 1] * 2
  assert (np.asarray(new)[:, len(ref) - 1:] == run.tok.eos_id).all(), "finished rows are padded with EOS"


@pytest.mark.slow
def test_cli_and_samples_after_training(tmp_path, tok, write_checkpoint, capsys):
  write_checkpoint(tmp_path / "run", tok)
  sample.main([str(tmp_path / "run"), "--prompt", "The Python", "--prompt", "A", "--max_new_tokens", "5",
               "--temperature", "0", "--json"])
  out = json.loads(capsys.readouterr().out)
  assert [s["prompt"] for s in out] == ["The Python", "A"] and all(s["text"].startswith(s["prompt"]) for s in out)
  got = sample.samples_after_training(str(tmp_path / "run"), max_new_tokens=6)
  saved = json.loads((tmp_path / "run" / sample.SAMPLES_FILE).read_text())
  assert saved["step"] == 5 and [s["prompt"] for s in saved["samples"]] == list(sample.SAMPLE_PROMPTS)
  assert saved["samples"] == got and "sample (step 5)" in capsys.readouterr().out
  assert sample.samples_after_training(str(tmp_path / "nothing")) == []
  for argv, message in [(["--step", "3"], r"--step=3: .* steps \[5\]"),
                        (["--top_p", "0"], r"--top_p=0.0 is invalid: must be in \(0, 1\]"),
                        (["--max_new_tokens", "40"], "exceeds the model's seq_len 32")]:
    with pytest.raises(SystemExit) as e:
      sample.main([str(tmp_path / "run"), *argv])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and re.search(message, err), err
