"""gs:// workdirs and caches against a local GCS emulator on 127.0.0.1 (gcp-storage-emulator): the real gcsfs,
Orbax and tensorstore GCS code paths, no network."""
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest
from small_runs import run, small_cfg

from tinyjax import data
from tinyjax.runtime import faults, metrics, workdir as workdirs

BUCKET = "tinyjax-test"


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def gcs():
  """The emulator, in memory, with one bucket; the environment variables that point gcsfs and tensorstore at it."""
  pytest.importorskip("gcp_storage_emulator", reason="pip install -e '.[test]'")
  port = _free_port()
  proc = subprocess.Popen([sys.executable, os.path.join(os.path.dirname(__file__), "gcs_emulator.py"), str(port)],
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
  assert proc.stdout.readline().strip() == "ready"
  url = f"http://127.0.0.1:{port}"
  saved = {k: os.environ.get(k) for k in ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL",
                                          "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT")}
  # gcsfs's newer bucket-type probe speaks gRPC, which the emulator does not: use its plain JSON-API client.
  os.environ.update(STORAGE_EMULATOR_HOST=url, TENSORSTORE_GCS_HTTP_URL=url, GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false")
  import gcsfs  # noqa: PLC0415
  fs = gcsfs.GCSFileSystem(token="anon", project="test")
  for _ in range(100):
    try:
      fs.mkdir(BUCKET)
      break
    except Exception:  # noqa: BLE001 - not listening yet
      time.sleep(0.1)
  yield fs
  proc.terminate()
  proc.wait(timeout=10)
  for key, value in saved.items():
    if value is None:
      os.environ.pop(key, None)
    else:
      os.environ[key] = value


def test_remote_workdir_preempted_on_a_fresh_host_resumes_bitwise(gcs, tmp_path):
  cache = str(tmp_path / "cache")
  run(small_cfg(cache), str(tmp_path / "local"))
  expected = metrics.read(str(tmp_path / "local"))
  url = f"gs://{BUCKET}/runs/w1"
  with pytest.raises(faults.Preempted):
    run(small_cfg(cache), url, sigterm_at=6)
  assert sorted(p.rsplit("/", 1)[-1] for p in gcs.ls(f"{BUCKET}/runs/w1/checkpoints")) == ["4", "6"]
  shutil.rmtree(workdirs.Workdir(url, cache).local)  # the VM was recreated: nothing local survives
  run(small_cfg(cache), url)
  remote = [json.loads(line) for line in gcs.cat(f"{BUCKET}/runs/w1/metrics.jsonl").decode().splitlines()]
  strip = lambda rows: [{k: v for k, v in r.items() if k not in ("training_time", "tokens_per_second",
                                                                 "eta_seconds")} for r in rows if "event" not in r]
  assert strip(remote) == strip(expected), "the resumed remote run must equal the uninterrupted local one"
  assert remote[-1]["param_sha256"] == expected[-1]["param_sha256"]
  info = json.loads(gcs.cat(f"{BUCKET}/runs/w1/run_info.json"))
  assert info["status"] == "completed"
  results = json.loads(gcs.cat(f"{BUCKET}/runs/w1/speedrun_results.json"))
  assert results["runs"][0]["run_info"]["model_size"] > 0
  assert gcs.exists(f"{BUCKET}/runs/w1/config.json") and gcs.ls(f"{BUCKET}/runs/w1/tensorboard")


def test_export_and_samples_read_a_remote_run(gcs, tmp_path):
  from tinyjax import export, sample  # noqa: PLC0415
  cache, url = str(tmp_path / "cache"), f"gs://{BUCKET}/runs/w2"
  run(small_cfg(cache, **{"train.num_train_steps": 4}), url)
  loaded = export.load_run(url)
  assert loaded.step == 4
  out = sample.samples_after_training(url, prompts=("def",), max_new_tokens=4)
  assert len(out) == 1 and json.loads(gcs.cat(f"{BUCKET}/runs/w2/samples.json"))["step"] == 4


def test_prebuilt_cache_on_gcs_is_read_in_place(gcs, tmp_path):
  """A Levanter cache uploaded to the bucket trains exactly as the same cache on local disk, with no local copy."""
  cache = str(tmp_path / "cache")
  cfg = small_cfg(cache, **{"train.num_train_steps": 3, "checkpoint.enabled": False})
  ds = data.prepare(cfg)  # tinyjax's own build of the train split: Levanter's TreeCache layout
  gcs.put(ds.train_cache + "/", f"{BUCKET}/caches/train/", recursive=True)
  run(cfg, str(tmp_path / "a"))
  cfg_gs = small_cfg(cache, **{"train.num_train_steps": 3, "checkpoint.enabled": False})
  cfg_gs.data.train_urls = [f"gs://{BUCKET}/caches/train"]
  cfg_gs.data.tokenizer = ds.tokenizer_path  # the tokenizer that built it (its ledger records the sha256)
  run(cfg_gs, str(tmp_path / "b"))
  losses = lambda w: [r["loss"] for r in metrics.read(str(w)) if "loss" in r]
  assert losses(tmp_path / "b") == losses(tmp_path / "a")
  assert not os.path.exists(os.path.join(cache, "remote")), "gs:// caches are read in place, never mirrored"
