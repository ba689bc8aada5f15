"""tinyjax.data.cache: the builtin corpus's caches in Levanter's layout, Levanter caches written without tinyjax
(flat and sharded layouts) read as they are, prebuilt caches used in place, reuse of built caches, and unfinished
caches or caches of another tokenizer refused."""
import json
import os

import numpy as np
import pytest
import tensorstore as ts

from tinyjax import config, data
from tinyjax.data import cache, corpus

TRAIN, VALID = "builtin:python-docs/train", "builtin:python-docs/validation"
VOCAB = 512  # the session token cache's builtin tokenizer
LLAMA3 = ("meta-llama/Meta-Llama-3.1-8B", 128256, True)  # a Levanter ledger's tokenizer, vocab_size, append_bos


def make_cfg(root):
  cfg = config.base()
  cfg.data.cache_dir = str(root)
  cfg.model.vocab_size, cfg.model.seq_len, cfg.train.train_batch_size = VOCAB, 64, 8
  return cfg


def test_cache_stream_equals_encoded_documents(ds, cache_tok):
  docs = list(corpus.documents(VALID))
  encoded = cache_tok.encode_batch(docs)
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


def test_reads_cache_written_independently(tmp_path, levanter_store, write_ledger):
  rng = np.random.default_rng(0)
  docs = [rng.integers(0, 128256, size=rng.integers(1, 300)) for _ in range(50)]
  flat = levanter_store(tmp_path / "c", docs)
  write_ledger(tmp_path / "c", len(docs), len(flat), *LLAMA3)
  c = cache.TokenCache(str(tmp_path / "c"), tokenizer_name="meta-llama/Meta-Llama-3.1-8B")
  assert (c.num_docs, c.num_tokens) == (50, len(flat))
  np.testing.assert_array_equal(c.read(0, len(flat)), flat, err_msg="cannot read a Levanter-written cache")
  with pytest.raises(config.ConfigError, match=r"data\.tokenizer"):  # Levanter ledgers record only the name
    cache.TokenCache(str(tmp_path / "c"), tokenizer_name="gpt2")
  # Levanter's newer "sharded" layout: one store per shard dir, read as their concatenation.
  flat_b = levanter_store(tmp_path / "s" / "00001_b", docs[:7])
  flat_a = levanter_store(tmp_path / "s" / "00000_a", docs[7:])
  write_ledger(tmp_path / "s", 50, len(flat), *LLAMA3, layout="sharded", finished_shards=["00000_a", "00001_b"])
  s = cache.TokenCache(str(tmp_path / "s"))
  both = np.concatenate([flat_a, flat_b])
  np.testing.assert_array_equal(s.read(0, len(both)), both)
  cut = len(flat_a)
  np.testing.assert_array_equal(s.read(cut - 3, cut + 4), both[cut - 3:cut + 4], err_msg="read across shards")


def test_unfinished_cache_is_refused(tmp_path, levanter_store, write_ledger):
  docs = [np.arange(10)]
  levanter_store(tmp_path / "c", docs)
  write_ledger(tmp_path / "c", 1, 10, *LLAMA3, finished=False)
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


# ---- caches from elsewhere ----

def test_prebuilt_levanter_cache_is_read_as_is(tmp_path, tok_dir, data_cfg, cache_stream, levanter_cache):
  rng = np.random.default_rng(0)
  flat = levanter_cache(tmp_path / "fineweb" / "train", [rng.integers(0, 400, rng.integers(1, 200))
                                                          for _ in range(40)])
  cfg = data_cfg(tmp_path / "c", tok_dir, [str(tmp_path / "fineweb" / "train")])
  with pytest.raises(config.ConfigError, match=r"data\.tokenizer=.*does not match.*Meta-Llama-3\.1-8B"):
    data.prepare(cfg)  # the ledger names another tokenizer
  cfg.data.tokenizer = "stanford-crfm/marin-tokenizer"  # same ids as Llama-3.1: accepted (if it were loadable)
  assert cache.TokenCache(str(tmp_path / "fineweb" / "train"), tokenizer_name=cfg.data.tokenizer,
                          tokenizer_vocab_size=400).num_tokens == len(flat)
  with pytest.raises(config.ConfigError, match="400 ids"):
    cache.TokenCache(str(tmp_path / "fineweb" / "train"), tokenizer_name=cfg.data.tokenizer,
                     tokenizer_vocab_size=128256)
  cfg.data.tokenizer = str(tok_dir)
  meta_path = tmp_path / "fineweb" / "train" / "shard_ledger.json"
  led = json.loads(meta_path.read_text())
  led["metadata"]["preprocessor_metadata"]["tokenizer"] = str(tok_dir)
  meta_path.write_text(json.dumps(led))
  ds = data.prepare(cfg)
  assert ds.train_cache == str(tmp_path / "fineweb" / "train"), "a prebuilt cache is used in place, not copied"
  np.testing.assert_array_equal(cache_stream(ds.train_cache), flat)
  with pytest.raises(config.ConfigError, match="only source"):
    data.prepare(data_cfg(tmp_path / "c", tok_dir, [str(tmp_path / "fineweb" / "train"), "x.jsonl"]))
  (tmp_path / "nocache").mkdir()
  with pytest.raises(config.ConfigError, match="neither a supported file.*nor a Levanter cache"):
    data.prepare(data_cfg(tmp_path / "c", tok_dir, [str(tmp_path / "nocache")]))

def test_cache_of_another_tokenizer_is_refused(c4_ds):
  with pytest.raises(config.ConfigError, match=r"config\.data\.tokenizer=.*does not match the tokenizer that built"):
    cache.TokenCache(c4_ds[1].train_cache, tokenizer_sha256="0" * 64, tokenizer_name="other")
