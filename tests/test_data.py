"""Pins the data path: built-in corpus, tokenizer + Marin byte lengths, Levanter cache layout, Grain loader order."""
import json
import os

import numpy as np
import pytest
import tensorstore as ts
from levanter_store import write_levanter_store

from tinyjax import config, data
from tinyjax.data import cache, corpus, tokenizer as tokenizers

TRAIN, VALID = "builtin:python-docs/train", "builtin:python-docs/validation"
VOCAB = 512  # small: trains in ~1 s


def make_cfg(root, seq_len=64, batch=8, **train):
  cfg = config.base()
  cfg.data.cache_dir = str(root)
  cfg.model.vocab_size = VOCAB
  cfg.model.seq_len = seq_len
  cfg.train.train_batch_size = batch
  for k, v in train.items():
    setattr(cfg.train, k, v)
  return cfg


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def ds(root):
  return data.prepare(make_cfg(root))


@pytest.fixture(scope="module")
def tok(ds, root):
  return tokenizers.load(ds.tokenizer_path, str(root), [TRAIN], VOCAB)


def stream(path):
  c = cache.TokenCache(path)
  return c.read(0, c.num_tokens)


# ---- corpus ----

def test_corpus_split_is_disjoint_stable_and_sized():
  train, valid = list(corpus.documents(TRAIN)), list(corpus.documents(VALID))
  assert train == list(corpus.documents(TRAIN)), "corpus order changed between calls: caches would not be reusable"
  assert not set(train) & set(valid), "a document is in both splits: validation leaks into training"
  assert all(corpus.is_validation(d) for d in valid) and not any(corpus.is_validation(d) for d in train), \
      "split is not the content hash rule"
  frac = len(valid) / (len(train) + len(valid))
  assert 0.03 < frac < 0.08, f"validation holds {frac:.1%} of documents; expected ~5%"
  train_bytes, valid_bytes = (sum(len(d.encode()) for d in docs) for docs in (train, valid))
  assert 1_000_000 < train_bytes < 10_000_000, f"train split is {train_bytes} bytes: extraction broke"
  assert 20_000 < valid_bytes < 1_000_000, f"validation split is {valid_bytes} bytes: extraction broke"


def test_corpus_docstrings_are_deterministic_and_included():
  path = os.path.join(os.path.dirname(json.__file__), "__init__.py")
  docs = corpus.docstrings(path)
  assert docs and docs == corpus.docstrings(path), "ast docstring extraction is not deterministic"
  everything = set(corpus.documents(TRAIN)) | set(corpus.documents(VALID))
  assert set(docs) <= everything, "stdlib docstrings (json/__init__.py) are missing from the corpus"


def test_unknown_builtin_source_names_the_config_keys():
  for url in ("builtin:python-docs/test", "builtin:c4"):
    with pytest.raises(config.ConfigError, match=r"data\.train_urls.*builtin:python-docs/train"):
      corpus.source_id(url)


# ---- tokenizer ----

def test_tokenizer_encodes_as_levanter(tok):
  """Levanter BatchTokenizer: the post-processor adds BOS; EOS is appended as TEXT " " + eos_token."""
  assert (tok.append_bos, tok.append_eos) == (False, True), "builtin BPE adds BOS itself, like Llama-3"
  docs = list(corpus.documents(VALID))[:20] + ["naïve café — 日本語 ✓\n\ttabs  and  spaces "]
  for doc, ids in zip(docs, tok.encode_batch(docs)):
    assert ids[0] == tok.bos_id == 0 and ids[-1] == tok.eos_id == 1, "documents must be [BOS] ... [EOS]"
    assert tok.tokenizer.decode(ids.tolist()) == doc + " ", "byte-level BPE must round-trip doc + ' ' (then EOS)"
    expected = [0] + tok.tokenizer.encode(doc + " ", add_special_tokens=False).ids + [1]
    assert ids.tolist() == expected, "not BOS + encode(text + ' ') + EOS"
  assert tok.vocab_size == VOCAB, "builtin tokenizer should fill cfg.model.vocab_size"


def test_byte_lengths_follow_marin_rule(tok):
  t = tok.tokenizer
  lengths = tokenizers.byte_lengths(t, VOCAB + 8)
  assert lengths.dtype == np.int32 and lengths.shape == (VOCAB + 8,)
  assert lengths[tok.bos_id] == 0 and lengths[tok.eos_id] == 0, "special tokens carry no bytes"
  assert (lengths[VOCAB:] == 0).all(), "ids past the tokenizer (embedding padding) carry no bytes"
  # Byte-level BPE spells "\n" as "Ċ" and a leading space as "Ġ".
  for piece, expected in [(".", 1), ("a", 1), ("Ċ", 1), ("Ġthe", 4), ("ing", 3)]:
    i = t.token_to_id(piece)
    assert i is not None and lengths[i] == expected, f"{piece!r} should count {expected} bytes (leading space kept)"
  text = "The quick brown fox jumps over the lazy dog.\n    It isn't here; see also: foo_bar(x=1)."
  ids = tok.encode_batch([text])[0]
  assert lengths[ids].sum() == len(text.encode()) + 1, "bytes of an ASCII document (+ the ' ' before EOS) must " \
      "equal its UTF-8 length"


def test_tokenizer_larger_than_vocab_is_a_config_error(ds, root):
  cfg = make_cfg(root)
  cfg.data.tokenizer = ds.tokenizer_path
  cfg.model.vocab_size = VOCAB - 1
  with pytest.raises(config.ConfigError, match=r"model\.vocab_size"):
    data.prepare(cfg)


# ---- cache ----

def test_cache_stream_equals_encoded_documents(ds, tok):
  docs = list(corpus.documents(VALID))
  encoded = tok.encode_batch(docs)
  c = cache.TokenCache(ds.eval_caches["python_docs"])
  assert c.num_docs == len(docs) and c.num_tokens == sum(map(len, encoded))
  np.testing.assert_array_equal(c.read(0, c.num_tokens), np.concatenate(encoded),
                                err_msg="cache stream is not [BOS] doc [EOS] of every document in order")
  np.testing.assert_array_equal(c.offsets(), np.concatenate([[0], np.cumsum(list(map(len, encoded)))]))
  assert c.read(5, 17).tolist() == np.concatenate(encoded)[5:17].tolist()


def test_cache_files_match_levanter_layout(ds):
  path = ds.eval_caches["python_docs"]
  with open(os.path.join(path, "shard_ledger.json")) as f:
    ledger = json.load(f)
  for key in ("total_num_rows", "shard_rows", "is_finished", "finished_shards", "field_counts", "metadata"):
    assert key in ledger, f"CacheLedger field {key} missing: Levanter could not load this cache"
  meta = ledger["metadata"]["preprocessor_metadata"]
  # Levanter's flags: append_bos = "BOS added as text" (no: the post-processor adds it), append_eos = " <eos>" text.
  assert meta["append_bos"] is False and meta["append_eos"] is True and meta["vocab_size"] == VOCAB
  offsets = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": f"{path}/input_ids/offsets"}}).result()
  n = int(offsets[0].read().result())
  assert n == ledger["total_num_rows"], "offsets[0] must be the row count (Levanter JaggedArrayStore)"
  assert int(offsets[n].read().result()) == ledger["field_counts"]["input_ids"], "offsets[n] must be the data size"
  for name, dtype in (("offsets", "int64"), ("data", "int32")):
    with open(os.path.join(path, "input_ids", name, "zarr.json")) as f:
      z = json.load(f)
    assert z["shape"] == [2**54] and z["data_type"] == dtype, f"{name}: Levanter declares [2^54] {dtype}"
    assert z["chunk_grid"]["configuration"]["chunk_shape"] == [134217728]
    shard = z["codecs"][0]
    assert shard["name"] == "sharding_indexed" and shard["configuration"]["chunk_shape"] == [262144]
    blosc = [c for c in shard["configuration"]["codecs"] if c["name"] == "blosc"]
    assert blosc and blosc[0]["configuration"]["clevel"] == 5


def _ledger(path, rows, tokens, finished=True, **extra):
  ledger = {"total_num_rows": rows, "shard_rows": {"": rows}, "is_finished": finished, "finished_shards": [""],
            "field_counts": {"input_ids": tokens},
            "metadata": {"preprocessor_metadata": {"tokenizer": "meta-llama/Meta-Llama-3.1-8B", "vocab_size": 128256,
                                                   "append_bos": True, "append_eos": True}}, **extra}
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "shard_ledger.json"), "w") as f:
    json.dump(ledger, f)


def test_reads_cache_written_independently(tmp_path):
  rng = np.random.default_rng(0)
  docs = [rng.integers(0, 128256, size=rng.integers(1, 300)) for _ in range(50)]
  flat = write_levanter_store(tmp_path / "c", docs)
  _ledger(tmp_path / "c", len(docs), len(flat))
  c = cache.TokenCache(str(tmp_path / "c"), tokenizer_name="meta-llama/Meta-Llama-3.1-8B")
  assert (c.num_docs, c.num_tokens) == (50, len(flat))
  np.testing.assert_array_equal(c.read(0, len(flat)), flat, err_msg="cannot read a Levanter-written cache")
  with pytest.raises(config.ConfigError, match=r"data\.tokenizer"):  # Levanter ledgers record only the name
    cache.TokenCache(str(tmp_path / "c"), tokenizer_name="gpt2")
  # Levanter's newer "sharded" layout: one store per shard dir, read as their concatenation.
  flat_b = write_levanter_store(tmp_path / "s" / "00001_b", docs[:7])
  flat_a = write_levanter_store(tmp_path / "s" / "00000_a", docs[7:])
  _ledger(tmp_path / "s", 50, len(flat), layout="sharded", finished_shards=["00000_a", "00001_b"])
  s = cache.TokenCache(str(tmp_path / "s"))
  both = np.concatenate([flat_a, flat_b])
  np.testing.assert_array_equal(s.read(0, len(both)), both)
  cut = len(flat_a)
  np.testing.assert_array_equal(s.read(cut - 3, cut + 4), both[cut - 3:cut + 4], err_msg="read across shards")


def test_unfinished_cache_is_refused(tmp_path):
  docs = [np.arange(10)]
  write_levanter_store(tmp_path / "c", docs)
  _ledger(tmp_path / "c", 1, 10, finished=False)
  with pytest.raises(RuntimeError, match="unfinished"):
    cache.TokenCache(str(tmp_path / "c"))

  def killed():
    yield np.arange(5, dtype=np.int32)
    raise KeyboardInterrupt("killed mid-build")
  with pytest.raises(KeyboardInterrupt):
    cache.write(str(tmp_path / "k"), killed(), {})
  assert not (tmp_path / "k").exists(), "an interrupted build must not appear at the final path"
  assert not list(tmp_path.glob("k.tmp-*")), "a failed build should remove its temporary directory"
  with pytest.raises(FileNotFoundError):
    cache.TokenCache(str(tmp_path / "k"))


def test_other_tokenizer_is_refused(ds):
  with pytest.raises(config.ConfigError, match=r"data\.tokenizer"):
    cache.TokenCache(ds.train_cache, tokenizer_sha256="0" * 64)


def test_prepare_is_idempotent(ds, root, capsys):
  again = data.prepare(make_cfg(root))
  assert "built" not in capsys.readouterr().out, "second prepare rebuilt a cache"
  assert (again.train_cache, again.eval_caches, again.tokenizer_path) == (ds.train_cache, ds.eval_caches,
                                                                         ds.tokenizer_path)
  np.testing.assert_array_equal(again.byte_lengths, ds.byte_lengths)
  assert ds.byte_lengths.shape == (VOCAB,)


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
