"""Fixtures of the data tests (test_corpus.py, test_cache.py, test_builder.py, test_loader.py): real-corpus inputs
in their exact formats (C4 `en` json.gz shards, FineWeb-Edu parquet, Paloma jsonl.gz), a Llama-3-style HF tokenizer,
their C4 cache built once, and Levanter caches written directly with tensorstore.

  files          {"dir", "c4", "fineweb", "paloma"}: the source files and their documents
  tok_dir        a small Llama-3-style tokenizer (byte-level BPE, vocab 400, BOS by its post-processor)
  c4_ds          (cfg, data.prepare(cfg)) of the C4 train files and the Paloma validation file
  data_cfg       data_cfg(cache_dir, tok_dir, train_urls, validation_urls=None, **data_keys) -> a config
  expected_ids   expected_ids(tok_dir, text): Levanter's encoding of one document, computed independently
  cache_stream / ledger   a cache's whole token stream / its shard_ledger.json
  build_one      build_one(tmp_path, tok_dir, path, **data_keys): data.prepare of one source
  good_lines     good_lines(n): n JSONL records of random-word documents
  write_c4 / write_lines   a C4 shard; raw lines (optionally gzipped)
  levanter_cache levanter_cache(path, docs): a finished Levanter cache (store and ledger) written without tinyjax
  root / ds / cache_tok   the session token cache (conftest's token_cache), its data.prepare (built-in corpus,
                 vocab 512) and its tokenizer (not conftest's `tok`, the export tests' toy tokenizer)
"""
import gzip
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from tinyjax import config, data
from tinyjax.data import cache

BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
SEQ = 32


def _write_c4(path, docs):
  """allenai/c4 en shard format: gzip of one JSON object per line with text, timestamp, url."""
  with gzip.open(path, "wt", encoding="utf-8") as f:
    for i, d in enumerate(docs):
      f.write(json.dumps({"text": d, "timestamp": "2019-04-25T12:57:54Z", "url": f"https://example.com/{i}"}) + "\n")


@pytest.fixture(scope="session")
def write_c4():
  return _write_c4


@pytest.fixture(scope="session")
def write_lines():
  def write(path, lines: list[bytes], gz=False):
    with (gzip.open if gz else open)(path, "wb") as f:
      f.write(b"".join(line + b"\n" for line in lines))
  return write


@pytest.fixture(scope="session")
def files(tmp_path_factory, make_docs):
  d = tmp_path_factory.mktemp("src")
  c4 = [make_docs(i, 40) for i in range(3)]
  for i, docs in enumerate(c4):
    _write_c4(d / f"c4-train.{i:05d}-of-00003.json.gz", docs)
  fineweb = make_docs(7, 120)
  table = pa.table({"text": fineweb, "id": [f"<urn:uuid:{i}>" for i in range(120)], "dump": ["CC-MAIN-2013-20"] * 120,
                    "url": ["https://example.com"] * 120, "score": np.linspace(2.5, 4.5, 120)})
  pq.write_table(table, d / "000_00000.parquet", row_group_size=50)
  paloma = make_docs(11, 30)
  with gzip.open(d / "val.jsonl.gz", "wt", encoding="utf-8") as f:  # Paloma c4_en/val: text, id, source, metadata
    for i, t in enumerate(paloma):
      f.write(json.dumps({"text": t, "id": str(i), "source": "c4_en", "metadata": {}}) + "\n")
  return {"dir": d, "c4": c4, "fineweb": fineweb, "paloma": paloma}


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory, files):
  """A small Llama-3-style tokenizer: byte-level BPE whose post-processor adds BOS; EOS in tokenizer_config.json."""
  d = tmp_path_factory.mktemp("tok")
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=[BOS, EOS], show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator([t for docs in files["c4"] for t in docs], trainer=trainer)
  tok.post_processor = processors.Sequence([processors.ByteLevel(trim_offsets=False), processors.TemplateProcessing(
      single=f"{BOS} $A", special_tokens=[(BOS, tok.token_to_id(BOS))])])
  tok.save(str(d / "tokenizer.json"))
  (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": BOS, "eos_token": EOS}))
  return d


@pytest.fixture(scope="session")
def expected_ids():
  def ids(tok_dir, text):
    """Levanter's encoding of one document, computed independently: BOS + ids(text + " ") + EOS."""
    t = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    return [t.token_to_id(BOS)] + t.encode(text + " ", add_special_tokens=False).ids + [t.token_to_id(EOS)]
  return ids


def _data_cfg(root, tok_dir, train, valid=None, **data_kw):
  cfg = config.base()
  d = cfg.data
  d.cache_dir, d.tokenizer, d.train_urls = str(root), str(tok_dir), list(train)
  d.validation_urls = valid or {}
  d.num_proc = 1
  for k, v in data_kw.items():
    setattr(d, k, v)
  cfg.model.vocab_size, cfg.model.seq_len = 512, SEQ
  cfg.train.train_batch_size = 8
  return cfg


@pytest.fixture(scope="session")
def data_cfg():
  return _data_cfg


@pytest.fixture(scope="session")
def cache_stream():
  def read(path):
    c = cache.TokenCache(path)
    return c.read(0, c.num_tokens)
  return read


@pytest.fixture(scope="session")
def ledger():
  def read(path):
    with open(os.path.join(path, "shard_ledger.json")) as f:
      return json.load(f)
  return read


@pytest.fixture(scope="session")
def c4_ds(tmp_path_factory, files, tok_dir):
  d = files["dir"]
  cfg = _data_cfg(tmp_path_factory.mktemp("cache"), tok_dir, [str(d / "c4-train.*-of-00003.json.gz")],
                  {"paloma/c4_en": [str(d / "val*.jsonl.gz")]})
  return cfg, data.prepare(cfg)


@pytest.fixture(scope="session")
def build_one():
  def build(tmp_path, tok_dir, path, **kw):
    return data.prepare(_data_cfg(tmp_path / "cache", tok_dir, [str(path)], **kw))
  return build


@pytest.fixture(scope="session")
def good_lines(make_docs):
  return lambda n: [json.dumps({"text": t}).encode() for t in make_docs(3, n)]


@pytest.fixture(scope="session")
def levanter_cache(levanter_store, write_ledger):
  def write(path, docs):
    """A Levanter cache (store + ledger) written without tinyjax.data.cache."""
    flat = levanter_store(path, docs)
    write_ledger(path, len(docs), len(flat), "meta-llama/Meta-Llama-3.1-8B", 400, False, shards=("shard_0",))
    return flat
  return write


@pytest.fixture(scope="session")
def root(token_cache):
  return token_cache


@pytest.fixture(scope="session")
def ds(root):
  cfg = config.base()
  cfg.data.cache_dir, cfg.model.vocab_size = str(root), 512
  return data.prepare(cfg)


@pytest.fixture(scope="session")
def cache_tok(ds, root):
  from tinyjax.data import tokenizer  # noqa: PLC0415
  return tokenizer.load(ds.tokenizer_path, str(root), ["builtin:python-docs/train"], 512)
