"""Real-corpus inputs on fixtures in their exact formats: C4 `en` json.gz shards, FineWeb-Edu parquet, Paloma
jsonl.gz, a Llama-3-style HF tokenizer, and a Levanter cache written directly with tensorstore. Pins the round trip
text -> cache -> windows, prebuilt caches, remote URLs (fsspec memory://), resumable/parallel builds, bad input."""
import gzip
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from levanter_store import write_levanter_store
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from tinyjax import config, data
from tinyjax.data import builder, cache, corpus, tokenizer as tokenizers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
WORDS = ("the of and to in is was for on that with as by at from his an were are which this be also has or had first "
         "one their its new after who they two her she been other when time during there into school more may years "
         "naïve café 日本 — ✓ data model token cache shard").split()
SEQ = 32


def make_docs(seed, n, lo=5, hi=60):
  rng = np.random.default_rng(seed)
  return [" ".join(rng.choice(WORDS, size=rng.integers(lo, hi))) + rng.choice([".", ".\n\nNext.", "!"])
          for _ in range(n)]


def write_c4(path, docs):
  """allenai/c4 en shard format: gzip of one JSON object per line with text, timestamp, url."""
  with gzip.open(path, "wt", encoding="utf-8") as f:
    for i, d in enumerate(docs):
      f.write(json.dumps({"text": d, "timestamp": "2019-04-25T12:57:54Z", "url": f"https://example.com/{i}"}) + "\n")


def write_lines(path, lines: list[bytes], gz=False):
  with (gzip.open if gz else open)(path, "wb") as f:
    f.write(b"".join(line + b"\n" for line in lines))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  d = tmp_path_factory.mktemp("src")
  c4 = [make_docs(i, 40) for i in range(3)]
  for i, docs in enumerate(c4):
    write_c4(d / f"c4-train.{i:05d}-of-00003.json.gz", docs)
  fineweb = make_docs(7, 120)
  table = pa.table({"text": fineweb, "id": [f"<urn:uuid:{i}>" for i in range(120)], "dump": ["CC-MAIN-2013-20"] * 120,
                    "url": ["https://example.com"] * 120, "score": np.linspace(2.5, 4.5, 120)})
  pq.write_table(table, d / "000_00000.parquet", row_group_size=50)
  paloma = make_docs(11, 30)
  with gzip.open(d / "val.jsonl.gz", "wt", encoding="utf-8") as f:  # Paloma c4_en/val: text, id, source, metadata
    for i, t in enumerate(paloma):
      f.write(json.dumps({"text": t, "id": str(i), "source": "c4_en", "metadata": {}}) + "\n")
  return {"dir": d, "c4": c4, "fineweb": fineweb, "paloma": paloma}


@pytest.fixture(scope="module")
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


def expected_ids(tok_dir, text):
  """Levanter's encoding of one document, computed independently: BOS + ids(text + " ") + EOS."""
  t = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
  return [t.token_to_id(BOS)] + t.encode(text + " ", add_special_tokens=False).ids + [t.token_to_id(EOS)]


def make_cfg(root, tok_dir, train, valid=None, **data_kw):
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


def stream(path):
  c = cache.TokenCache(path)
  return c.read(0, c.num_tokens)


def ledger(path):
  with open(os.path.join(path, "shard_ledger.json")) as f:
    return json.load(f)


@pytest.fixture(scope="module")
def c4_ds(tmp_path_factory, files, tok_dir):
  d = files["dir"]
  cfg = make_cfg(tmp_path_factory.mktemp("cache"), tok_dir, [str(d / "c4-train.*-of-00003.json.gz")],
                 {"paloma/c4_en": [str(d / "val*.jsonl.gz")]})
  return cfg, data.prepare(cfg)


# ---- round trips ----

def test_c4_and_paloma_round_trip_to_windows(c4_ds, files, tok_dir):
  cfg, ds = c4_ds
  want = np.concatenate([expected_ids(tok_dir, t) for docs in files["c4"] for t in docs])
  got = stream(ds.train_cache)
  np.testing.assert_array_equal(got, want, err_msg="train stream is not Levanter's BOS + text + ' ' + EOS per C4 "
                                "document, files in sorted order")
  c = cache.TokenCache(ds.train_cache)
  assert c.num_docs == 120 and ledger(ds.train_cache)["field_counts"]["input_ids"] == len(want)
  assert set(ds.eval_caches) == {"paloma/c4_en"}, "eval-set names may contain '/' (Marin's paloma/<subset>)"
  val = np.concatenate([expected_ids(tok_dir, t) for t in files["paloma"]])
  np.testing.assert_array_equal(stream(ds.eval_caches["paloma/c4_en"]), val)
  windows = len(val) // SEQ
  assert data.num_eval_windows(ds, cfg, "paloma/c4_en") == windows, "non-overlapping, trailing partial dropped"
  rows = np.concatenate([b[m] for b, m in data.eval_batches(ds, cfg, "paloma/c4_en")])
  np.testing.assert_array_equal(rows, val[:windows * SEQ].reshape(-1, SEQ))
  train_rows = next(data.train_batches(ds, cfg))
  index = {got[i * SEQ:(i + 1) * SEQ].tobytes() for i in range(len(got) // SEQ)}
  assert all(r.tobytes() in index for r in train_rows), "training rows must be aligned windows of the stream"


def test_eval_metrics_are_named_eval_name_bpb(c4_ds, tok_dir):
  """Through evaluate.Evaluator with an all-zero-logit model: keys eval/paloma/c4_en/{loss,bpb}, and BPB = ln V
  nats per target token over the target tokens' bytes."""
  import jax.numpy as jnp

  from tinyjax import evaluate, sharding
  from tinyjax.kernels import loss

  class Uniform:  # all-zero logits over 512 ids, as the loss statistics Transformer returns with targets
    def apply(self, variables, tokens_BL, targets_BL):
      return loss.reference_stats(jnp.zeros(tokens_BL.shape + (1,)), jnp.zeros((1, 512)), targets_BL)

  cfg, ds = c4_ds
  cfg.mesh.data = 1
  out = evaluate.Evaluator(Uniform(), ds, cfg, sharding.batch_sharding(sharding.make_mesh(cfg.mesh)))({})
  assert {"eval/paloma/c4_en/loss", "eval/paloma/c4_en/bpb"} <= out.keys(), sorted(out)
  assert out["eval/paloma/c4_en/loss"] == pytest.approx(np.log(512), rel=1e-5)
  assert out["eval/paloma/c4_en/bytes"] > 0 and 0 < out["eval/paloma/c4_en/bpb_exact"] < 20


def test_fineweb_parquet_round_trip(tmp_path, files, tok_dir):
  cfg = make_cfg(tmp_path, tok_dir, [str(files["dir"] / "*.parquet")])
  ds = data.prepare(cfg)
  want = np.concatenate([expected_ids(tok_dir, t) for t in files["fineweb"]])
  np.testing.assert_array_equal(stream(ds.train_cache), want, err_msg="parquet `text` column, rows in order")


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
  import importlib.util
  for name in ("c4_30m", "c4_50m", "c4_75m", "c4_130m"):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    d = module.get_config().data
    assert d.tokenizer == "stanford-crfm/marin-tokenizer", name
    assert list(d.validation_urls) == ["paloma/c4_en"], f"{name}: metric must be eval/paloma/c4_en/bpb"
    assert d.validation_urls["paloma/c4_en"] == ["hf://datasets/allenai/paloma@65cd6fc/c4_en/val/val*.jsonl.gz"]
    assert list(d.train_urls) == ["hf://datasets/marin-community/fineweb-edu-pretokenized-10B/train"], name


# ---- remote sources and prebuilt caches ----

def _levanter_store(path, docs):
  """A Levanter cache (store + ledger) written without tinyjax.data.cache."""
  flat = write_levanter_store(path, docs)
  with open(os.path.join(path, "shard_ledger.json"), "w") as f:
    json.dump({"total_num_rows": len(docs), "shard_rows": {"shard_0": len(docs)}, "is_finished": True,
               "finished_shards": ["shard_0"], "field_counts": {"input_ids": len(flat)},
               "metadata": {"preprocessor_metadata": {"tokenizer": "meta-llama/Meta-Llama-3.1-8B",
                                                      "vocab_size": 400, "append_bos": False, "append_eos": True}}},
              f)
  return flat


def test_prebuilt_levanter_cache_is_read_as_is(tmp_path, tok_dir):
  rng = np.random.default_rng(0)
  flat = _levanter_store(tmp_path / "fineweb" / "train", [rng.integers(0, 400, rng.integers(1, 200))
                                                          for _ in range(40)])
  cfg = make_cfg(tmp_path / "c", tok_dir, [str(tmp_path / "fineweb" / "train")])
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
  np.testing.assert_array_equal(stream(ds.train_cache), flat)
  with pytest.raises(config.ConfigError, match="only source"):
    data.prepare(make_cfg(tmp_path / "c", tok_dir, [str(tmp_path / "fineweb" / "train"), "x.jsonl"]))
  (tmp_path / "nocache").mkdir()
  with pytest.raises(config.ConfigError, match="neither a supported file.*nor a Levanter cache"):
    data.prepare(make_cfg(tmp_path / "c", tok_dir, [str(tmp_path / "nocache")]))


def test_remote_files_and_caches_through_fsspec(tmp_path, files, tok_dir, monkeypatch):
  """memory:// stands in for gs://: the same fsspec code paths (glob, open, recursive get) run offline."""
  fs = fsspec.filesystem("memory")
  for i in range(3):
    fs.pipe(f"/bucket/c4/c4-train.{i:05d}-of-00003.json.gz",
            (files["dir"] / f"c4-train.{i:05d}-of-00003.json.gz").read_bytes())
  assert corpus.expand("memory://bucket/c4/*.json.gz") == [f"memory:///bucket/c4/c4-train.{i:05d}-of-00003.json.gz"
                                                           for i in range(3)]
  cfg = make_cfg(tmp_path / "c", tok_dir, ["memory://bucket/c4/c4-train.{00000..00002}-of-00003.json.gz"])
  ds = data.prepare(cfg)
  want = np.concatenate([expected_ids(tok_dir, t) for docs in files["c4"] for t in docs])
  np.testing.assert_array_equal(stream(ds.train_cache), want)
  fs.put(ds.train_cache, "/bucket/cache/train", recursive=True)  # a remote prebuilt cache
  cfg2 = make_cfg(tmp_path / "d", tok_dir, ["memory://bucket/cache/train"])
  mirrored = data.prepare(cfg2).train_cache
  assert mirrored.startswith(str(tmp_path / "d" / "remote")), "remote caches are mirrored under cache_dir/remote"
  np.testing.assert_array_equal(stream(mirrored), want)

  calls = []

  def fake_snapshot_download(repo_id, repo_type, revision, local_dir, allow_patterns):
    calls.append((repo_id, repo_type, revision, allow_patterns))
    fs.get("/bucket/cache/train", os.path.join(local_dir, "train"), recursive=True)
  import huggingface_hub
  monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
  local = cache.fetch("hf://datasets/org/cache-repo/train", str(tmp_path / "e"))
  assert calls == [("org/cache-repo", "dataset", None, ["train/*"])]
  np.testing.assert_array_equal(stream(local), want)
  assert cache.fetch("hf://datasets/org/cache-repo/train", str(tmp_path / "e")) == local and len(calls) == 1, \
      "a complete mirror is reused offline"


# ---- building: parallel, resumable, atomic, with progress ----

def test_parallel_build_equals_in_process_and_shows_progress(tmp_path, c4_ds, tok_dir, files, capsys, monkeypatch):
  monkeypatch.setattr(builder, "PROGRESS_SECONDS", 0.0)
  cfg = make_cfg(tmp_path, tok_dir, [str(files["dir"] / "c4-train.*-of-00003.json.gz")], num_proc=2)
  ds = data.prepare(cfg)
  out = capsys.readouterr().out
  np.testing.assert_array_equal(stream(ds.train_cache), stream(c4_ds[1].train_cache),
                                err_msg="2 build processes must give the in-process cache")
  line = [l for l in out.splitlines() if "docs/s" in l][-1]
  assert "3/3 files" in line and "tokens/s" in line and "MB/s" in line and "ETA" in line, line
  assert "built train cache" in out and "120 docs" in out


def _interrupted_build(tmp_path, tok_dir, files, monkeypatch):
  """Builds the C4 train split but raises while encoding the second file; returns the config."""
  cfg = make_cfg(tmp_path, tok_dir, [str(files["dir"] / "c4-train.*-of-00003.json.gz")])
  real = builder._encode_shard

  def dies_on_second(task):
    if task[0] == 1:
      raise KeyboardInterrupt("killed while encoding file 1")
    return real(task)
  monkeypatch.setattr(builder, "_encode_shard", dies_on_second)
  with pytest.raises(KeyboardInterrupt):
    data.prepare(cfg)
  monkeypatch.setattr(builder, "_encode_shard", real)
  return cfg


def test_interrupted_build_is_never_used_and_resumes(tmp_path, tok_dir, files, c4_ds, monkeypatch, capsys):
  cfg = _interrupted_build(tmp_path, tok_dir, files, monkeypatch)
  [key] = [p for p in os.listdir(tmp_path) if len(p) == 12]
  final = os.path.join(tmp_path, key, "train")
  assert not os.path.exists(final), "a half-built cache must not appear at its final path"
  assert ledger(final + ".building")["finished_shards"] == ["00000"] and not ledger(final + ".building")["is_finished"]
  with pytest.raises(RuntimeError, match="unfinished"):
    cache.TokenCache(final + ".building")
  encoded = []
  real = builder._encode_shard
  monkeypatch.setattr(builder, "_encode_shard", lambda task: encoded.append(task[0]) or real(task))
  ds = data.prepare(cfg)
  assert encoded == [1, 2], "resume must encode only the files the ledger does not list as finished"
  assert "resuming an interrupted build: 1/3 files done" in capsys.readouterr().out
  np.testing.assert_array_equal(stream(ds.train_cache), stream(c4_ds[1].train_cache),
                                err_msg="a resumed build must equal an uninterrupted one")
  assert not os.path.exists(final + ".building")


def test_killed_build_process_resumes(tmp_path, tok_dir, files, c4_ds):
  """SIGKILL a real build after its first file is recorded; the next build resumes from the ledger."""
  script = textwrap.dedent(f"""
      import time
      from tinyjax.data import builder, corpus, tokenizer
      real = builder._encode_shard
      def slow(task):
          if task[0] > 0:
              time.sleep(600)
          return real(task)
      builder._encode_shard = slow
      tok = tokenizer.load({str(tok_dir)!r}, {str(tmp_path)!r}, [], 512)
      files = corpus.expand({str(files["dir"] / "c4-train.*-of-00003.json.gz")!r})
      builder.build({str(tmp_path / "k" / "train")!r}, files, tok, name="train", text_key="text",
                  max_bad_fraction=0.01, num_proc=1)
      """)
  proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT)
  led = tmp_path / "k" / "train.building" / "shard_ledger.json"
  deadline = time.time() + 60
  while time.time() < deadline and not (led.exists() and json.loads(led.read_text())["finished_shards"]):
    time.sleep(0.2)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert json.loads(led.read_text())["finished_shards"] == ["00000"], "the kill came too early or too late"
  assert not (tmp_path / "k" / "train").exists()
  tok = tokenizers.load(str(tok_dir), str(tmp_path), [], 512)
  builder.build(str(tmp_path / "k" / "train"), corpus.expand(str(files["dir"] / "c4-train.*-of-00003.json.gz")), tok,
              name="train", text_key="text", max_bad_fraction=0.01, num_proc=1)
  np.testing.assert_array_equal(stream(str(tmp_path / "k" / "train")), stream(c4_ds[1].train_cache))


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


# ---- bad input ----

def build_one(tmp_path, tok_dir, path, **kw):
  return data.prepare(make_cfg(tmp_path / "cache", tok_dir, [str(path)], **kw))


def good_lines(n):
  return [json.dumps({"text": t}).encode() for t in make_docs(3, n)]


def test_truncated_and_corrupt_gzip_are_errors(tmp_path, tok_dir):
  whole = gzip.compress(b"".join(line + b"\n" for line in good_lines(400)))
  (tmp_path / "cut.jsonl.gz").write_bytes(whole[:len(whole) // 2])
  with pytest.raises(corpus.DataError, match=r"cut\.jsonl\.gz: corrupt or truncated \.gz data after record \d+.*"
                     r"expected a complete file"):
    build_one(tmp_path, tok_dir, tmp_path / "cut.jsonl.gz")
  (tmp_path / "bad.json.gz").write_bytes(b"this is not gzip at all\n" * 10)
  with pytest.raises(corpus.DataError, match=r"bad\.json\.gz: corrupt or truncated"):
    build_one(tmp_path, tok_dir, tmp_path / "bad.json.gz")


def test_few_bad_records_are_skipped_counted_and_recorded(tmp_path, tok_dir, capsys):
  lines = good_lines(400)
  lines[10] = b'{"text": "unterminated'
  lines[20] = json.dumps({"content": "no text key"}).encode()
  lines[30] = b'{"text": "bad \xff byte"}'
  lines[40] = json.dumps({"text": ""}).encode()
  write_lines(tmp_path / "a.jsonl.gz", lines, gz=True)
  (tmp_path / "b.jsonl.gz").write_bytes(b"")  # an empty file beside it
  ds = build_one(tmp_path, tok_dir, tmp_path / "*.jsonl.gz")
  assert cache.TokenCache(ds.train_cache).num_docs == 396
  skipped = ledger(ds.train_cache)["tinyjax_build"]["skipped"]
  assert skipped["counts"] == {"bad_json": 1, "bad_utf8": 1, "empty_docs": 1, "empty_files": 1, "missing_text": 1}
  assert any("a.jsonl.gz:11: bad_json: invalid JSON" in e for e in skipped["examples"]), skipped["examples"]
  assert any("a.jsonl.gz:21: missing_text: no 'text' field" in e for e in skipped["examples"])
  assert any("a.jsonl.gz:31: bad_utf8" in e for e in skipped["examples"])
  out = capsys.readouterr().out
  assert "skipped: bad_json 1, bad_utf8 1, empty_docs 1, empty_files 1, missing_text 1" in out, out


def test_mostly_bad_file_is_an_error_naming_file_and_line(tmp_path, tok_dir):
  lines = good_lines(50)
  lines[3] = lines[7] = b"not json"
  write_lines(tmp_path / "x.jsonl", lines)
  with pytest.raises(corpus.DataError, match=r"x\.jsonl:4: bad_json: invalid JSON.*2 of 50 records.*"
                     r"data\.max_bad_fraction=0\.01"):
    build_one(tmp_path, tok_dir, tmp_path / "x.jsonl")
  ds = build_one(tmp_path, tok_dir, tmp_path / "x.jsonl", max_bad_fraction=0.5)
  assert cache.TokenCache(ds.train_cache).num_docs == 48
  write_lines(tmp_path / "y.jsonl", good_lines(5))
  with pytest.raises(corpus.DataError, match=r"y\.jsonl:1: missing_text: no 'body' field \(data\.text_key\); "
                     r"keys: \['text'\]"):
    build_one(tmp_path, tok_dir, tmp_path / "y.jsonl", text_key="body")


def test_missing_sources_and_empty_inputs_are_errors(tmp_path, tok_dir):
  with pytest.raises(corpus.DataError, match=r"config\.data\.train_urls: '.*/nothing-\*\.json\.gz' matched no files"):
    build_one(tmp_path, tok_dir, tmp_path / "nothing-*.json.gz")
  with pytest.raises(corpus.DataError, match=r"config\.data\.train_urls: '.*/absent\.jsonl': no such file"):
    build_one(tmp_path, tok_dir, tmp_path / "absent.jsonl")
  (tmp_path / "empty.jsonl").write_bytes(b"")
  with pytest.raises(corpus.DataError, match=r"data: train: the sources .*empty\.jsonl.* hold no documents "
                     r"\(skipped: empty_files 1\)"):
    build_one(tmp_path, tok_dir, tmp_path / "empty.jsonl")
  pq.write_table(pa.table({"content": ["a", "b"]}), tmp_path / "p.parquet")
  with pytest.raises(corpus.DataError, match=r"p\.parquet: no column 'text' \(data\.text_key\); columns: "
                     r"\['content'\]"):
    build_one(tmp_path, tok_dir, tmp_path / "p.parquet")
  with pytest.raises(config.ConfigError, match=r"data\.max_bad_fraction"):
    cfg = make_cfg(tmp_path, tok_dir, ["x.jsonl"], max_bad_fraction=2.0)
    config.validate(cfg)


def test_cache_of_another_tokenizer_is_refused(c4_ds):
  with pytest.raises(config.ConfigError, match=r"config\.data\.tokenizer=.*does not match the tokenizer that built"):
    cache.TokenCache(c4_ds[1].train_cache, tokenizer_sha256="0" * 64, tokenizer_name="other")


def test_data_cli_builds_and_summarises(tmp_path, files, tok_dir):
  cfg_file = tmp_path / "cfg.py"
  cfg_file.write_text(textwrap.dedent(f"""
      from tinyjax import config
      def get_config():
        c = config.base()
        c.data.cache_dir, c.data.tokenizer = {str(tmp_path / "cache")!r}, {str(tok_dir)!r}
        c.data.train_urls = [{str(files["dir"] / "c4-train.*-of-00003.json.gz")!r}]
        c.data.validation_urls = {{"paloma/c4_en": [{str(files["dir"] / "val*.jsonl.gz")!r}]}}
        c.model.vocab_size, c.model.seq_len, c.data.num_proc = 512, 32, 1
        return c
      """))
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  run = lambda *a: subprocess.run([sys.executable, "-m", "tinyjax.data", f"--config={cfg_file}", *a], cwd=ROOT,
                                  env=env, capture_output=True, text=True, timeout=120)
  r = run()
  assert r.returncode == 0, r.stderr
  assert "train: 120 docs" in r.stdout and "paloma/c4_en: 30 docs" in r.stdout and "windows of 32" in r.stdout
  r = run(f"--config.data.cache_dir={tmp_path / 'other'}", "--config.data.text_key=body")
  assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
  assert r.stderr.startswith("tinyjax: error: ") and "c4-train.00000-of-00003.json.gz:1: missing_text: no 'body' " \
      "field (data.text_key)" in r.stderr, r.stderr
