"""Faults the audit found (issue 10): an overflowing update never reaches the state or a checkpoint, and a
preempted-then-resumed run logs exactly the rows of an uninterrupted run."""
import errno
import logging
import math
import sys

import pytest
from small_runs import run, small_cfg

from tinyjax.runtime import faults, metrics

TIMING = ("training_time", "tokens_per_second", "eta_seconds")


def _rows(workdir):
  """Metric rows without events and wall-clock fields: what must match between two runs."""
  return [{k: v for k, v in r.items() if k not in TIMING} for r in metrics.read(str(workdir)) if "event" not in r]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp("cache"))


def test_overflowing_update_stops_the_run_before_it_is_applied(cache, tmp_path):
  """Finite loss and gradients, but lr 1e39 overflows the parameters: exit-3 path, nothing saved."""
  cfg = small_cfg(cache, **{"optimizer.learning_rate": 1e39, "optimizer.adam_lr": 1e39})
  with pytest.raises(faults.Diverged, match="non-finite parameters or optimizer state after the update at step 1"):
    run(cfg, tmp_path)
  saved = [p.name for p in (tmp_path / "checkpoints").iterdir()] if (tmp_path / "checkpoints").exists() else []
  assert not any(name.isdigit() for name in saved), "no checkpoint may hold the overflowed state"


def test_skipped_overflowing_updates_keep_the_state_finite(cache, tmp_path):
  cfg = small_cfg(cache, **{"optimizer.learning_rate": 1e39, "optimizer.adam_lr": 1e39,
                            "train.skip_bad_steps": True})
  run(cfg, tmp_path)
  rows = [r for r in metrics.read(str(tmp_path)) if "loss" in r and "event" not in r]
  assert rows[-1]["bad_steps"] == 8, "every update overflowed and was skipped"
  assert all(math.isfinite(r["param_norm"]) for r in rows)
  assert len({round(r["param_norm"], 6) for r in rows}) == 1, "no update was applied"
  events = [r for r in metrics.read(str(tmp_path)) if r.get("event") == "skipped_bad_steps"]
  assert events and "parameters or optimizer state" in events[0]["message"]


@pytest.mark.parametrize("log_every", [1, pytest.param(5, marks=pytest.mark.slow)])
def test_preempted_run_resumes_to_the_uninterrupted_rows(cache, tmp_path, log_every):
  full, cut = tmp_path / "full", tmp_path / "cut"
  run(small_cfg(cache, **{"train.log_every": log_every}), full)
  with pytest.raises(faults.Preempted):
    run(small_cfg(cache, **{"train.log_every": log_every}), cut, sigterm_at=5)
  run(small_cfg(cache, **{"train.log_every": log_every}), cut)
  assert _rows(cut) == _rows(full), "a resumed run's metrics.jsonl must equal an uninterrupted run's, row for row"


@pytest.mark.parametrize("coefficient_type", ["simple", "quintic", "polar_express", "aol"])
@pytest.mark.parametrize("shape", [(6, 10), (10, 6)])
def test_newton_schulz_sets_equal_a_numpy_transcription(coefficient_type, shape):
  """Levanter zeropower_via_newtonschulz5 in float64 NumPy: normalise by the Frobenius norm (+eps), iterate on the
  wide orientation, X <- aX + (bA + cA^2)X with A = XX^T, the sets used cyclically (9 steps: past every set)."""
  import numpy as np  # noqa: PLC0415

  from tinyjax import optim  # noqa: PLC0415
  g = np.random.default_rng(0).standard_normal(shape)
  x = g / (np.linalg.norm(g) + 1e-5)
  x = x.T if shape[0] > shape[1] else x
  sets = {"simple": [(3.4445, -4.7750, 2.0315)],
          "quintic": [(4.0848, -6.8946, 2.9270), (3.9505, -6.3029, 2.6377), (3.7418, -5.5913, 2.3037),
                      (2.8769, -3.1427, 1.2046), (2.8366, -3.0525, 1.2012)],
          "polar_express": [(8.2051, -22.9019, 16.4607), (4.0664, -2.8612, 0.5184), (3.9096, -2.8234, 0.5250),
                            (3.2856, -2.4153, 0.4853), (2.2779, -1.6198, 0.3985), (1.8726, -1.2307, 0.3585),
                            (1.8564, -1.2132, 0.3568), (1.8750, -1.2500, 0.3750)],
          "aol": [(4.0098, -7.0585, 2.4635), (3.4585, -5.5479, 2.5959), (2.7573, -3.2939, 1.4254),
                  (2.7215, -3.0494, 1.3169)]}[coefficient_type]
  for i in range(9):
    a, b, c = sets[i % len(sets)]
    gram = x @ x.T
    x = a * x + (b * gram + c * gram @ gram) @ x
  expected = x.T if shape[0] > shape[1] else x
  got = np.asarray(optim.newton_schulz(np.asarray(g, np.float32), 9, coefficient_type, 1e-5), np.float64)
  np.testing.assert_allclose(got, expected, rtol=2e-4, atol=2e-4)


def test_byte_table_equals_levanters_rule_through_transformers(tmp_path):
  """Levanter's byte_length_of_token, run with transformers on an offline tokenizer whose tokenizer_config.json has
  clean_up_tokenization_spaces=true and which has added special tokens beyond BOS/EOS (like Llama-3's <|eot_id|>):
  0 only for all_special_ids, else len(decode([id('.'), id]).utf8) - 1 under transformers' decode rules."""
  import json  # noqa: PLC0415

  import numpy as np  # noqa: PLC0415
  from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: PLC0415

  from tinyjax.data import tokenizer as tokenizers  # noqa: PLC0415
  transformers = pytest.importorskip("transformers")
  bos, eos, extra = "<|begin_of_text|>", "<|end_of_text|>", ["<|eot_id|>", "<|reserved_special_token_0|>"]
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
  text = ["It is here . Is it ? Yes ! No , it isn't . I'm sure it's done , we've seen they're here ."] * 50
  tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=300, special_tokens=[bos, eos],
                                                    initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  tok.add_special_tokens([AddedToken(t, special=True) for t in extra])
  tok.save(str(tmp_path / "tokenizer.json"))
  with open(tmp_path / "tokenizer_config.json", "w") as f:
    # transformers >= 5 skips the clean-up for BPE tokenizers unless forced; Levanter ran transformers 4.x, which
    # applied it (Marin's Llama-3 BPB counts ' .' as 1 byte), so the reference is forced to the 4.x behaviour.
    json.dump({"bos_token": bos, "eos_token": eos, "clean_up_tokenization_spaces": True,
               "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output": True,
               "tokenizer_class": "PreTrainedTokenizerFast"}, f)
  hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  dot = hf.encode(".", add_special_tokens=False)[0]
  levanter = [0 if i in hf.all_special_ids else len(hf.decode([dot, i]).encode("utf-8")) - 1 for i in range(len(hf))]
  loaded = tokenizers.load(str(tmp_path), str(tmp_path / "cache"), [], len(hf))
  ours = tokenizers.byte_lengths(loaded.tokenizer, len(hf), loaded.special_ids, loaded.clean_up_spaces)
  np.testing.assert_array_equal(ours, levanter)
  eot = tok.token_to_id("<|eot_id|>")
  assert ours[eot] == len("<|eot_id|>") and ours[tok.token_to_id(bos)] == 0, "only all_special_ids count 0"
  space_dot = tok.token_to_id("Ġ.")
  assert space_dot is not None and ours[space_dot] == 1, "clean_up_tokenization_spaces: ' .' decodes to 1 byte"


def test_rerun_finishes_records_a_stop_after_the_final_checkpoint_left(cache, tmp_path):
  """Killed after the final checkpoint was committed but before the end-of-run records: the rerun writes them."""
  import json  # noqa: PLC0415
  import os  # noqa: PLC0415
  run(small_cfg(cache), tmp_path)
  full = metrics.read(str(tmp_path))
  with open(tmp_path / "metrics.jsonl", "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in full if "param_sha256" not in r)
  os.remove(tmp_path / "speedrun_results.json")
  info = json.load(open(tmp_path / "run_info.json"))
  json.dump({**info, "status": "running"}, open(tmp_path / "run_info.json", "w"))
  run(small_cfg(cache), tmp_path)
  assert [r["param_sha256"] for r in metrics.read(str(tmp_path)) if "param_sha256" in r] == \
      [r["param_sha256"] for r in full if "param_sha256" in r]
  assert json.load(open(tmp_path / "run_info.json"))["status"] == "completed"
  assert (tmp_path / "speedrun_results.json").exists()


def test_a_second_trainer_is_refused_and_a_stale_lock_is_taken_over(cache, tmp_path):
  import os  # noqa: PLC0415
  import subprocess  # noqa: PLC0415
  import sys  # noqa: PLC0415
  import time  # noqa: PLC0415

  from tinyjax.runtime import workdir as workdirs  # noqa: PLC0415
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  args = [sys.executable, "-m", "tinyjax.main", "--config=configs/tiny.py", f"--workdir={tmp_path}",
          f"--config.data.cache_dir={cache}", "--config.model.vocab_size=512", "--config.model.seq_len=32",
          "--config.train.train_batch_size=4", "--config.train.log_every=1", "--config.train.num_train_steps=100000"]
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  first = subprocess.Popen(args, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 240
    while not metrics.read(str(tmp_path)) and time.time() < deadline:
      time.sleep(0.2)
    second = subprocess.run(args, cwd=root, env=env, capture_output=True, text=True, timeout=240)
    assert second.returncode == 2 and "in use by another tinyjax run" in second.stderr, second.stderr[-2000:]
    assert metrics.read(str(tmp_path)), "the refused trainer must not touch the running one's files"
  finally:
    first.kill()  # kill -9: the lock stays behind, stale
    first.wait()
  assert (tmp_path / workdirs.LOCK).exists()
  lock = workdirs.Lock(str(tmp_path), str(tmp_path))
  lock.acquire()
  assert lock.held
  lock.release()
  assert not (tmp_path / workdirs.LOCK).exists()


def test_a_requested_platform_that_is_absent_is_one_line_not_a_cpu_run():
  import os  # noqa: PLC0415
  import subprocess  # noqa: PLC0415
  import sys  # noqa: PLC0415
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  r = subprocess.run([sys.executable, "-m", "tinyjax.main", "--config=configs/tiny.py", "--config.env.platform=tpu",
                      "--dry_run"], cwd=root, env=env, capture_output=True, text=True, timeout=120)
  assert r.returncode == 2, r.stderr[-2000:]
  assert r.stderr.strip().splitlines()[-1].startswith("tinyjax: error: config.env.platform='tpu'")
  assert "Traceback" not in r.stderr
  ok = subprocess.run([sys.executable, "-m", "tinyjax.main", "--config=configs/tiny.py", "--config.env.platform=cpu",
                       "--dry_run"], cwd=root, env=env, capture_output=True, text=True, timeout=120)
  assert ok.returncode == 0, ok.stderr[-2000:]
  import json  # noqa: PLC0415
  plan = json.loads(ok.stdout)
  assert plan["env"]["backend"] == "cpu" and plan["env"]["jax_config"]["jax_platforms"] == "cpu"


@pytest.mark.slow  # three runs (~30 s on 2 cores)
def test_damaged_newest_checkpoint_is_moved_aside_and_reruns_keep_working(cache, tmp_path):
  """Item 1: a damaged newest checkpoint -> resume from the previous one, the damaged one kept as
  <step>.corrupt-<time>; the run ends where an uninterrupted one ends, and a further rerun still works.
  Item 2: a stray numbered folder gets the same fallback instead of a KeyError."""
  import os  # noqa: PLC0415
  full, w = tmp_path / "full", tmp_path / "w"
  run(small_cfg(cache), full)
  run(small_cfg(cache), w)
  os.remove(w / "checkpoints" / "8" / "state" / "manifest.ocdbt")
  run(small_cfg(cache), w)
  names = sorted(os.listdir(w / "checkpoints"))
  assert "8" in names and any(n.startswith("8.corrupt-") for n in names), names
  sha = lambda d: [r["param_sha256"] for r in metrics.read(str(d)) if "param_sha256" in r][-1]
  assert sha(w) == sha(full)
  (w / "checkpoints" / "99").mkdir()
  assert run(small_cfg(cache), w) == {"step": 8}, "the stray folder is skipped; step 8 is complete"
  assert any(n.startswith("99.corrupt-") for n in os.listdir(w / "checkpoints"))


def _chained(inner, outer):
  try:
    try:
      raise inner
    except Exception as e:  # noqa: BLE001
      raise outer from e
  except Exception as e:  # noqa: BLE001
    return e


def test_a_full_disk_is_recognised_in_the_forms_python_tensorstore_and_orbax_raise():
  assert faults.disk_full_reason(OSError(errno.ENOSPC, "No space left on device")) == "No space left on device"
  assert faults.disk_full_reason(OSError(errno.EDQUOT, "quota")) == "Disk quota exceeded"
  tensorstore = ValueError('RESOURCE_EXHAUSTED: Error writing "bad_steps/0" in OCDBT database: Failed to write 17174 '
                           "bytes to file 4: No space left on device [os_error_code='28']")
  assert faults.disk_full_reason(_chained(tensorstore, RuntimeError("Save Finalize thread failed"))) == \
      "No space left on device"
  assert faults.disk_full_reason(_chained(OSError(errno.EACCES, "Permission denied"), RuntimeError("x"))) is None
  assert faults.disk_full_reason(ValueError("NOT_FOUND: manifest.ocdbt")) is None
  assert faults.disk_full_reason(None) is None


class _LateCallback:
  def __init__(self, error):
    self.error = error

  def __del__(self):
    raise self.error


def test_background_noise_filter_drops_only_what_main_reports_itself(monkeypatch, caplog):
  forwarded = []
  monkeypatch.setattr(sys, "unraisablehook", lambda args: forwarded.append(str(args.exc_value)))
  undo = faults.quiet_background_noise()
  try:
    _LateCallback(RuntimeError("Event loop is closed"))  # dropped at once: tensorstore's callback after Orbax's loop
    _LateCallback(RuntimeError("something else"))
    full = OSError(errno.ENOSPC, "No space left on device")
    logging.getLogger("absl").error("save failed", exc_info=(OSError, full, None))
    logging.getLogger("orbax").error("a different failure")
  finally:
    undo()
  assert forwarded == ["something else"]
  assert [r.getMessage() for r in caplog.records] == ["a different failure"]
  assert sys.unraisablehook is not None and not logging.getLogger("absl").filters  # undone
