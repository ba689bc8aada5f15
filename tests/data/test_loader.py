"""tinyjax.data.loader: Grain's training order (a permutation of aligned windows, a function of seed and step, split
across processes, independent of workers) and the evaluation batches, on the session's builtin-corpus cache; and the
builtin tokenizer (Levanter's encoding, Marin's byte lengths)."""
import numpy as np
import pytest

from tinyjax import config, data
from tinyjax.data import cache, corpus, tokenizer as tokenizers

TRAIN, VALID = "builtin:python-docs/train", "builtin:python-docs/validation"
VOCAB = 512  # the session token cache's builtin tokenizer


def make_cfg(root, seq_len=64, batch=8, **train):
  cfg = config.base()
  cfg.data.cache_dir = str(root)
  cfg.model.vocab_size = VOCAB
  cfg.model.seq_len = seq_len
  cfg.train.train_batch_size = batch
  for k, v in train.items():
    setattr(cfg.train, k, v)
  return cfg


def stream(path):
  c = cache.TokenCache(path)
  return c.read(0, c.num_tokens)


# ---- tokenizer ----

def test_tokenizer_encodes_as_levanter(cache_tok):
  """Levanter BatchTokenizer: the post-processor adds BOS; EOS is appended as TEXT " " + eos_token."""
  assert (cache_tok.append_bos, cache_tok.append_eos) == (False, True), "builtin BPE adds BOS itself, like Llama-3"
  docs = list(corpus.documents(VALID))[:20] + ["naïve café — 日本語 ✓\n\ttabs  and  spaces "]
  for doc, ids in zip(docs, cache_tok.encode_batch(docs)):
    assert ids[0] == cache_tok.bos_id == 0 and ids[-1] == cache_tok.eos_id == 1, "documents must be [BOS] ... [EOS]"
    assert cache_tok.tokenizer.decode(ids.tolist()) == doc + " ", "byte-level BPE must round-trip doc + ' ' (then EOS)"
    expected = [0] + cache_tok.tokenizer.encode(doc + " ", add_special_tokens=False).ids + [1]
    assert ids.tolist() == expected, "not BOS + encode(text + ' ') + EOS"
  assert cache_tok.vocab_size == VOCAB, "builtin tokenizer should fill cfg.model.vocab_size"


def test_byte_lengths_follow_marin_rule(cache_tok):
  t = cache_tok.tokenizer
  lengths = tokenizers.byte_lengths(t, VOCAB + 8)
  assert lengths.dtype == np.int32 and lengths.shape == (VOCAB + 8,)
  assert lengths[cache_tok.bos_id] == 0 and lengths[cache_tok.eos_id] == 0, "special tokens carry no bytes"
  assert (lengths[VOCAB:] == 0).all(), "ids past the tokenizer (embedding padding) carry no bytes"
  # Byte-level BPE spells "\n" as "Ċ" and a leading space as "Ġ".
  for piece, expected in [(".", 1), ("a", 1), ("Ċ", 1), ("Ġthe", 4), ("ing", 3)]:
    i = t.token_to_id(piece)
    assert i is not None and lengths[i] == expected, f"{piece!r} should count {expected} bytes (leading space kept)"
  text = "The quick brown fox jumps over the lazy dog.\n    It isn't here; see also: foo_bar(x=1)."
  ids = cache_tok.encode_batch([text])[0]
  assert lengths[ids].sum() == len(text.encode()) + 1, "bytes of an ASCII document (+ the ' ' before EOS) must " \
      "equal its UTF-8 length"


def test_tokenizer_larger_than_vocab_is_a_config_error(ds, root):
  cfg = make_cfg(root)
  cfg.data.tokenizer = ds.tokenizer_path
  cfg.model.vocab_size = VOCAB - 1
  with pytest.raises(config.ConfigError, match=r"model\.vocab_size"):
    data.prepare(cfg)


# ---- loader ----

def take(it, n):
  return [next(it) for _ in range(n)]


def test_train_windows_are_a_permutation_of_stream_slices(ds, root):
  cfg = make_cfg(root, seq_len=1024, batch=8)
  flat = stream(ds.train_cache)
  n = len(flat) // 1024
  index = {flat[i * 1024:(i + 1) * 1024].tobytes(): i for i in range(n)}
  batches = take(data.train_batches(ds, cfg), n // 8 + 2)
  assert batches[0].shape == (8, 1024) and batches[0].dtype == np.int32
  ids = [index.get(row.tobytes(), -1) for b in batches for row in b]
  assert -1 not in ids, "a training row is not an aligned window data[i*S:(i+1)*S] of the stream"
  assert sorted(ids[:n]) == list(range(n)), "the first epoch must visit every window exactly once"
  assert ids[:n] != list(range(n)), "windows are not shuffled"
  assert ids[n:2 * n] != ids[:n][:len(ids) - n], "second epoch should be a new permutation"


def test_order_is_a_function_of_seed_and_step(ds, root):
  cfg = make_cfg(root)
  first = take(data.train_batches(ds, cfg), 8)
  np.testing.assert_array_equal(np.stack(first), np.stack(take(data.train_batches(ds, cfg), 8)),
                                err_msg="same data_seed gave a different order")
  resumed = take(data.train_batches(ds, cfg, start_step=5), 3)
  np.testing.assert_array_equal(np.stack(resumed), np.stack(first[5:8]),
                                err_msg="start_step=5 must yield what the uninterrupted iterator yields from step 5")
  cfg.train.data_seed = 7
  other = take(data.train_batches(ds, cfg), 2)
  assert not np.array_equal(np.stack(other), np.stack(first[:2])), "data_seed does not change the order"


def test_processes_split_each_global_batch(ds, root):
  cfg = make_cfg(root)
  full = take(data.train_batches(ds, cfg, start_step=3), 2)
  halves = [take(data.train_batches(ds, cfg, start_step=3, process_index=p, process_count=2), 2) for p in (0, 1)]
  for step in range(2):
    assert halves[0][step].shape == (4, 64)
    np.testing.assert_array_equal(np.concatenate([halves[0][step], halves[1][step]]), full[step],
                                  err_msg="process p must get rows [p*B/P, (p+1)*B/P) of the global batch")


@pytest.mark.slow
def test_workers_do_not_change_order(ds, root):
  cfg = make_cfg(root)
  expected = take(data.train_batches(ds, cfg, start_step=2), 4)
  cfg.data.num_workers = 2
  got = take(data.train_batches(ds, cfg, start_step=2), 4)
  np.testing.assert_array_equal(np.stack(got), np.stack(expected), err_msg="num_workers changed the batch order")


def test_eval_batches_cover_windows_in_order_with_padding(ds, root):
  name = "python_docs"
  flat = stream(ds.eval_caches[name])
  windows = len(flat) // 256
  size = next(b for b in (8, 6, 10, 12, 14) if windows % b)  # a partial last batch (the corpus varies by Python)
  cfg = make_cfg(root, seq_len=256, batch=size)
  assert data.num_eval_windows(ds, cfg, name) == windows, "trailing partial window must be dropped"
  batches = list(data.eval_batches(ds, cfg, name))
  assert len(batches) == -(-windows // size), "one batch per Be windows, the last one padded"
  rows = np.concatenate([b for b, m in batches])
  mask = np.concatenate([m for b, m in batches])
  assert mask.sum() == windows and mask[:windows].all(), "mask must mark exactly the real windows"
  np.testing.assert_array_equal(rows[:windows], flat[:windows * 256].reshape(-1, 256),
                                err_msg="eval windows are not the stream's windows in order")
  assert (rows[~mask] == ds.eos_id).all(), "padding rows must be EOS"
  halves = [list(data.eval_batches(ds, cfg, name, process_index=p, process_count=2)) for p in (0, 1)]
  last = [h[-1] for h in halves]
  np.testing.assert_array_equal(np.concatenate([last[0][0], last[1][0]]), batches[-1][0])
  np.testing.assert_array_equal(np.concatenate([last[0][1], last[1][1]]), batches[-1][1])
  cfg.train.max_eval_batches = 2
  assert len(list(data.eval_batches(ds, cfg, name))) == 2, "max_eval_batches cap ignored"
  cfg.train.max_eval_batches, cfg.train.eval_batch_size = 0, 2 * size
  assert len(list(data.eval_batches(ds, cfg, name))) == -(-windows // (2 * size)), "eval_batch_size ignored"


@pytest.mark.slow
def test_loader_order_independent_of_processes_and_workers(c4_ds):
  cfg, ds = c4_ds
  expected = next(data.train_batches(ds, cfg, start_step=3))
  first = next(data.train_batches(ds, cfg, 3, 0, 2))
  cfg.data.num_workers = 2
  try:
    second = next(data.train_batches(ds, cfg, 3, 1, 2))
  finally:
    cfg.data.num_workers = 0
  np.testing.assert_array_equal(np.concatenate([first, second]), expected,
                                err_msg="process 0 (no workers) + process 1 (2 workers) must split the 1-process batch")
