"""gs:// workdirs and caches (tinyjax/runtime/files.py, workdir.py) against conftest's local GCS emulator on
127.0.0.1 (gcp-storage-emulator): the real gcsfs, Orbax and tensorstore GCS code paths, no network."""
import json
import os
import shutil

import pytest

from tinyjax import data, errors
from tinyjax.runtime import workdir as workdirs


@pytest.mark.slow  # three runs against the emulator (~25 s on 2 cores)
def test_remote_workdir_preempted_on_a_fresh_host_resumes_bitwise(gcs, small_cfg, train_run, rows, reference_run):
  expected = rows(reference_run)  # the small config's uninterrupted local run
  url = f"gs://{gcs.bucket}/runs/w1"
  with pytest.raises(errors.Preempted):
    train_run(small_cfg(), url, stop_at=6)
  assert sorted(p.rsplit("/", 1)[-1] for p in gcs.ls(f"{gcs.bucket}/runs/w1/checkpoints")) == ["4", "6"]
  shutil.rmtree(workdirs.Workdir(url, small_cfg().data.cache_dir).local)  # the VM was recreated: nothing local survives
  train_run(small_cfg(), url)
  remote = [json.loads(line) for line in gcs.cat(f"{gcs.bucket}/runs/w1/metrics.jsonl").decode().splitlines()]
  strip = lambda rows: [{k: v for k, v in r.items() if k not in ("training_time", "tokens_per_second",
                                                                 "eta_seconds")} for r in rows if "event" not in r]
  assert strip(remote) == strip(expected), "the resumed remote run must equal the uninterrupted local one"
  assert remote[-1]["param_sha256"] == expected[-1]["param_sha256"]
  info = json.loads(gcs.cat(f"{gcs.bucket}/runs/w1/run_info.json"))
  assert info["status"] == "completed"
  results = json.loads(gcs.cat(f"{gcs.bucket}/runs/w1/speedrun_results.json"))
  assert results["runs"][0]["run_info"]["model_size"] > 0
  assert gcs.exists(f"{gcs.bucket}/runs/w1/config.json") and gcs.ls(f"{gcs.bucket}/runs/w1/tensorboard")


@pytest.mark.slow  # a run, an export and a sample against the emulator (~15 s on 2 cores)
def test_export_and_samples_read_a_remote_run(gcs, small_cfg, train_run):
  from tinyjax import sample, weights  # noqa: PLC0415
  url = f"gs://{gcs.bucket}/runs/w2"
  train_run(small_cfg(**{"train.num_train_steps": 4}), url)
  loaded = weights.load_run(url)
  assert loaded.step == 4
  out = sample.samples_after_training(url, prompts=("def",), max_new_tokens=4)
  assert len(out) == 1 and json.loads(gcs.cat(f"{gcs.bucket}/runs/w2/samples.json"))["step"] == 4


@pytest.mark.slow  # two runs, one reading the emulator (~15 s on 2 cores)
def test_prebuilt_cache_on_gcs_is_read_in_place(gcs, small_cfg, train_run, rows, tmp_path):
  """A Levanter cache uploaded to the bucket trains exactly as the same cache on local disk, with no local copy."""
  cfg = small_cfg(**{"train.num_train_steps": 3, "checkpoint.enabled": False})
  cache = cfg.data.cache_dir
  ds = data.prepare(cfg)  # tinyjax's own build of the train split: Levanter's TreeCache layout
  gcs.put(ds.train_cache + "/", f"{gcs.bucket}/caches/train/", recursive=True)
  train_run(cfg, str(tmp_path / "a"))
  cfg_gs = small_cfg(**{"train.num_train_steps": 3, "checkpoint.enabled": False})
  cfg_gs.data.train_urls = [f"gs://{gcs.bucket}/caches/train"]
  cfg_gs.data.tokenizer = ds.tokenizer_path  # the tokenizer that built it (its ledger records the sha256)
  mirrored = lambda: sorted(os.walk(os.path.join(cache, "remote")))  # the session's cache: others may use it too
  before = mirrored()
  train_run(cfg_gs, str(tmp_path / "b"))
  losses = lambda w: [r["loss"] for r in rows(w) if "loss" in r]
  assert losses(tmp_path / "b") == losses(tmp_path / "a")
  assert mirrored() == before, "gs:// caches are read in place, never mirrored"
