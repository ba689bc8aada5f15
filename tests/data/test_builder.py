"""tinyjax.data.builder (data.prepare's cache builds): text -> cache round trips for C4, Paloma and FineWeb-Edu
parquet, parallel/resumable/atomic builds with progress, a killed build resumed, bad records skipped or refused, and
`python -m tinyjax.data`."""
import json
import os
import signal
import textwrap
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tinyjax import config, data
from tinyjax.data import builder, cache, corpus, tokenizer as tokenizers

SEQ = 32  # data_cfg's seq_len


def test_c4_and_paloma_round_trip_to_windows(c4_ds, files, tok_dir, cache_stream, ledger, expected_ids):
  cfg, ds = c4_ds
  want = np.concatenate([expected_ids(tok_dir, t) for docs in files["c4"] for t in docs])
  got = cache_stream(ds.train_cache)
  np.testing.assert_array_equal(got, want, err_msg="train stream is not Levanter's BOS + text + ' ' + EOS per C4 "
                                "document, files in sorted order")
  c = cache.TokenCache(ds.train_cache)
  assert c.num_docs == 120 and ledger(ds.train_cache)["field_counts"]["input_ids"] == len(want)
  assert set(ds.eval_caches) == {"paloma/c4_en"}, "eval-set names may contain '/' (Marin's paloma/<subset>)"
  val = np.concatenate([expected_ids(tok_dir, t) for t in files["paloma"]])
  np.testing.assert_array_equal(cache_stream(ds.eval_caches["paloma/c4_en"]), val)
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


def test_fineweb_parquet_round_trip(tmp_path, files, tok_dir, data_cfg, cache_stream, expected_ids):
  cfg = data_cfg(tmp_path, tok_dir, [str(files["dir"] / "*.parquet")])
  ds = data.prepare(cfg)
  want = np.concatenate([expected_ids(tok_dir, t) for t in files["fineweb"]])
  np.testing.assert_array_equal(cache_stream(ds.train_cache), want, err_msg="parquet `text` column, rows in order")


@pytest.mark.slow
def test_parallel_build_equals_in_process_and_shows_progress(tmp_path, c4_ds, tok_dir, files, capsys, monkeypatch,
                                                             data_cfg, cache_stream):
  monkeypatch.setattr(builder, "PROGRESS_SECONDS", 0.0)
  cfg = data_cfg(tmp_path, tok_dir, [str(files["dir"] / "c4-train.*-of-00003.json.gz")], num_proc=2)
  ds = data.prepare(cfg)
  out = capsys.readouterr().out
  np.testing.assert_array_equal(cache_stream(ds.train_cache), cache_stream(c4_ds[1].train_cache),
                                err_msg="2 build processes must give the in-process cache")
  line = [l for l in out.splitlines() if "docs/s" in l][-1]
  assert "3/3 files" in line and "tokens/s" in line and "MB/s" in line and "ETA" in line, line
  assert "built train cache" in out and "120 docs" in out


def _interrupted_build(data_cfg, tmp_path, tok_dir, files, monkeypatch):
  """Builds the C4 train split but raises while encoding the second file; returns the config."""
  cfg = data_cfg(tmp_path, tok_dir, [str(files["dir"] / "c4-train.*-of-00003.json.gz")])
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


def test_interrupted_build_is_never_used_and_resumes(tmp_path, tok_dir, files, c4_ds, monkeypatch, capsys, data_cfg,
                                                     cache_stream, ledger):
  cfg = _interrupted_build(data_cfg, tmp_path, tok_dir, files, monkeypatch)
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
  np.testing.assert_array_equal(cache_stream(ds.train_cache), cache_stream(c4_ds[1].train_cache),
                                err_msg="a resumed build must equal an uninterrupted one")
  assert not os.path.exists(final + ".building")


@pytest.mark.slow
def test_killed_build_process_resumes(tmp_path, tok_dir, files, c4_ds, cache_stream, run_program):
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
  proc = run_program(code=script, popen=True, stdout=None, stderr=None)
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
  np.testing.assert_array_equal(cache_stream(str(tmp_path / "k" / "train")), cache_stream(c4_ds[1].train_cache))


def test_few_bad_records_are_skipped_counted_and_recorded(tmp_path, tok_dir, capsys, ledger, build_one, good_lines,
                                                          write_lines):
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


def test_mostly_bad_file_is_an_error_naming_file_and_line(tmp_path, tok_dir, build_one, good_lines, write_lines):
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


def test_missing_sources_and_empty_inputs_are_errors(tmp_path, tok_dir, data_cfg, build_one):
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
    cfg = data_cfg(tmp_path, tok_dir, ["x.jsonl"], max_bad_fraction=2.0)
    config.validate(cfg)


@pytest.mark.slow
def test_data_cli_builds_and_summarises(tmp_path, files, tok_dir, run_program):
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
  run = lambda *a: run_program(f"--config={cfg_file}", *a, module="tinyjax.data", timeout=120)
  r = run()
  assert r.returncode == 0, r.stderr
  assert "train: 120 docs" in r.stdout and "paloma/c4_en: 30 docs" in r.stdout and "windows of 32" in r.stdout
  r = run(f"--config.data.cache_dir={tmp_path / 'other'}", "--config.data.text_key=body")
  assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
  assert r.stderr.startswith("tinyjax: error: ") and "c4-train.00000-of-00003.json.gz:1: missing_text: no 'body' " \
      "field (data.text_key)" in r.stderr, r.stderr
