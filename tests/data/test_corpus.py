"""tinyjax.data.corpus: source formats (txt, JSON arrays), URL braces and hf:// parsing, the c4 configs' Marin data,
remote sources through fsspec (memory:// for gs://), and corrupt or truncated gzip."""
import gzip
import json
import importlib.util
import os

import fsspec
import numpy as np
import pytest

from tinyjax import config, data
from tinyjax.data import cache, corpus, tokenizer as tokenizers

TRAIN, VALID = "builtin:python-docs/train", "builtin:python-docs/validation"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_txt_and_json_array_formats(tmp_path):
  (tmp_path / "a.txt").write_text("first line\nsecond line\n")
  (tmp_path / "b.json").write_text(json.dumps([{"text": "one"}, {"text": "two"}]))
  skips = corpus.Skips()
  assert list(corpus.read(str(tmp_path / "a.txt"), "text", skips)) == ["first line\n", "second line\n"], \
      "Levanter TextUrlDataSource: one document per line, newline kept"
  assert list(corpus.read(str(tmp_path / "b.json"), "text", skips)) == ["one", "two"], "a .json array of objects"

def test_urls_braces_and_hf_parsing():
  assert corpus.braces("gs://b/c4-train.{00000..00002}-of-01024.json.gz") == [
      f"gs://b/c4-train.{i:05d}-of-01024.json.gz" for i in range(3)]
  assert corpus.braces("x/{a,b}/{1..2}.txt") == ["x/a/1.txt", "x/a/2.txt", "x/b/1.txt", "x/b/2.txt"]
  url = "hf://datasets/allenai/paloma@65cd6fc/c4_en/val/val*.jsonl.gz"
  assert corpus.parse_hf(url) == ("dataset", "allenai/paloma", "65cd6fc", "c4_en/val/val*.jsonl.gz")
  assert corpus.kind(url) == "file" and corpus.file_format(url) == (".jsonl", ".gz")
  assert corpus.file_format("c4-train.00000-of-01024.json.gz") == (".json", ".gz")
  assert corpus.kind("hf://datasets/marin-community/fineweb-edu-pretokenized-10B/train") == "cache"
  with pytest.raises(config.ConfigError, match="hf://datasets/ORG/NAME"):
    corpus.parse_hf("hf://nope")
  assert tokenizers.same_tokenizer("stanford-crfm/marin-tokenizer", "meta-llama/Meta-Llama-3.1-8B")
  assert not tokenizers.same_tokenizer("stanford-crfm/marin-tokenizer", "gpt2")

def test_c4_configs_name_marin_data():
  for name in ("c4_30m", "c4_50m", "c4_75m", "c4_130m"):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    d = module.get_config().data
    assert d.tokenizer == "stanford-crfm/marin-tokenizer", name
    assert list(d.validation_urls) == ["paloma/c4_en"], f"{name}: metric must be eval/paloma/c4_en/bpb"
    assert d.validation_urls["paloma/c4_en"] == ["hf://datasets/allenai/paloma@65cd6fc/c4_en/val/val*.jsonl.gz"]
    assert list(d.train_urls) == ["hf://datasets/marin-community/fineweb-edu-pretokenized-10B/train"], name

def test_remote_files_and_caches_through_fsspec(tmp_path, files, tok_dir, monkeypatch, data_cfg, cache_stream,
                                                expected_ids):
  """memory:// stands in for gs://: the same fsspec code paths (glob, open, recursive get) run offline."""
  fs = fsspec.filesystem("memory")
  for i in range(3):
    fs.pipe(f"/bucket/c4/c4-train.{i:05d}-of-00003.json.gz",
            (files["dir"] / f"c4-train.{i:05d}-of-00003.json.gz").read_bytes())
  assert corpus.expand("memory://bucket/c4/*.json.gz") == [f"memory:///bucket/c4/c4-train.{i:05d}-of-00003.json.gz"
                                                           for i in range(3)]
  cfg = data_cfg(tmp_path / "c", tok_dir, ["memory://bucket/c4/c4-train.{00000..00002}-of-00003.json.gz"])
  ds = data.prepare(cfg)
  want = np.concatenate([expected_ids(tok_dir, t) for docs in files["c4"] for t in docs])
  np.testing.assert_array_equal(cache_stream(ds.train_cache), want)
  fs.put(ds.train_cache, "/bucket/cache/train", recursive=True)  # a remote prebuilt cache
  cfg2 = data_cfg(tmp_path / "d", tok_dir, ["memory://bucket/cache/train"])
  mirrored = data.prepare(cfg2).train_cache
  assert mirrored.startswith(str(tmp_path / "d" / "remote")), "remote caches are mirrored under cache_dir/remote"
  np.testing.assert_array_equal(cache_stream(mirrored), want)

  calls = []

  def fake_snapshot_download(repo_id, repo_type, revision, local_dir, allow_patterns):
    calls.append((repo_id, repo_type, revision, allow_patterns))
    fs.get("/bucket/cache/train", os.path.join(local_dir, "train"), recursive=True)
  import huggingface_hub
  monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
  local = cache.fetch("hf://datasets/org/cache-repo/train", str(tmp_path / "e"))
  assert calls == [("org/cache-repo", "dataset", None, ["train/*"])]
  np.testing.assert_array_equal(cache_stream(local), want)
  assert cache.fetch("hf://datasets/org/cache-repo/train", str(tmp_path / "e")) == local and len(calls) == 1, \
      "a complete mirror is reused offline"

def test_truncated_and_corrupt_gzip_are_errors(tmp_path, tok_dir, build_one, good_lines):
  whole = gzip.compress(b"".join(line + b"\n" for line in good_lines(400)))
  (tmp_path / "cut.jsonl.gz").write_bytes(whole[:len(whole) // 2])
  with pytest.raises(corpus.DataError, match=r"cut\.jsonl\.gz: corrupt or truncated \.gz data after record \d+.*"
                     r"expected a complete file"):
    build_one(tmp_path, tok_dir, tmp_path / "cut.jsonl.gz")
  (tmp_path / "bad.json.gz").write_bytes(b"this is not gzip at all\n" * 10)
  with pytest.raises(corpus.DataError, match=r"bad\.json\.gz: corrupt or truncated"):
    build_one(tmp_path, tok_dir, tmp_path / "bad.json.gz")


# ---- the builtin corpus ----

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
