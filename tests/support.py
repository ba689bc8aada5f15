"""Test support that conftest.py exposes as fixtures (test modules never import it, nor each other): the one small
config, in-process runs with an injected stop signal or bad batch, the `python -m tinyjax.X` runner, finished
workdirs written without training, Levanter caches written without tinyjax, small text corpora, and the local GCS
emulator (`python tests/support.py gcs PORT`; its imports stay inside the functions so that it starts fast).
"""
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
SMALL_CONFIG = os.path.join(TESTS, "small_config.py")
# Metric fields that measure time: they differ between any two runs; everything else must match.
TIMING = ("training_time", "tokens_per_second", "eta_seconds")
# The programs the tests start run with XLA's default flags. (XLA:CPU's legacy fusion emitters,
# --xla_cpu_use_fusion_emitters=false, once compiled the small step faster; with the fused loss they make a small
# 8-step run 79 s instead of 18 s on the 2-core machine, so they are not used.)


def load_config(path: str):
  spec = importlib.util.spec_from_file_location(f"_tests_config_{os.path.basename(path)[:-3]}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def set_keys(cfg, overrides: dict):
  """overrides as {"group.key": value} (any depth) applied to cfg in place; returns cfg."""
  for key, value in overrides.items():
    *path, name = key.split(".")
    node = cfg
    for part in path:
      node = node[part]
    node[name] = value
  return cfg


def small_config(cache_dir: str, **overrides):
  """tests/small_config.py on `cache_dir`, with {"group.key": value} overrides."""
  cfg = load_config(SMALL_CONFIG)
  cfg.data.cache_dir = cache_dir
  return set_keys(cfg, overrides)


def train_run(cfg, workdir, stop_at: int | None = None, sig: int = signal.SIGTERM, nan_at: int | None = None):
  """train.run in this process. stop_at: `sig` is sent to this process during that step (a preemption notice);
  nan_at: that step's batch holds an out-of-vocabulary id (jnp.take fills its embedding row with NaN)."""
  from tinyjax import data, env, train  # noqa: PLC0415
  real = data.train_batches

  def batches(ds, cfg, start_step=0, *args):
    for step, rows in enumerate(real(ds, cfg, start_step, *args), start=start_step + 1):
      if step == nan_at:
        rows = rows.copy()
        rows[0, 3] = cfg.model.vocab_size + 7
      if step == stop_at:
        os.kill(os.getpid(), sig)  # handled between bytecodes: lands during this step
      yield rows
  data.train_batches = batches
  try:
    return train.run(cfg, str(workdir), env.record())
  finally:
    data.train_batches = real


def read_rows(workdir, name: str = "metrics.jsonl") -> list[dict]:
  from tinyjax.runtime import metrics  # noqa: PLC0415
  return metrics.read(str(workdir), name)


def stable_rows(workdir) -> list[dict]:
  """metrics.jsonl without event rows and the fields that measure time: what two runs of one config must share."""
  return [{k: v for k, v in r.items() if k not in TIMING} for r in read_rows(workdir) if "event" not in r]


def final_sha(workdir) -> list[str]:
  """The param_sha256 records of a run (one per completed run)."""
  return [r["param_sha256"] for r in read_rows(workdir) if "param_sha256" in r]


def child_env(**changes) -> dict:
  """This process's environment for a child tinyjax program: one CPU device, as in a user's shell (not the tests' 8
  fake ones, and no other XLA flag), the session's XLA cache; `NAME=None` removes a variable."""
  env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
  env.update(XLA_FLAGS="", JAX_PLATFORMS="cpu")
  for key, value in changes.items():
    if value is None:
      env.pop(key, None)
    else:
      env[key] = value
  return env


def run_program(*args, module: str = "tinyjax.main", code: str | None = None, cwd: str = ROOT, env: dict | None = None,
                timeout: float = 300, popen: bool = False, **popen_kwargs):
  """`python -m MODULE ARGS` (or `python -c CODE ARGS`) as a user runs it, from the checkout: a CompletedProcess
  (text), or with popen=True the running Popen (stdout and stderr piped)."""
  cmd = [sys.executable, *(["-c", code] if code is not None else ["-m", module]), *map(str, args)]
  env = child_env() if env is None else env
  if popen:
    return subprocess.Popen(cmd, cwd=cwd, env=env, text=True, **{"stdout": subprocess.PIPE, "stderr": subprocess.PIPE,
                                                                  **popen_kwargs})
  return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def assert_one_line(proc, code: int, expected: str) -> str:
  """A user-facing stop: exit `code`, exactly one non-empty stderr line, a tinyjax line holding `expected`, no
  traceback. Returns the line."""
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert proc.returncode == code, proc.stderr[-3000:]
  assert len(lines) == 1 and lines[0].startswith("tinyjax: ") and expected in lines[0], proc.stderr[-3000:]
  assert "Traceback" not in (proc.stdout or "") + proc.stderr
  return lines[0]


# ---- finished workdirs without training (results, compare, plot, sweep) ----

def make_workdir(path, config: str = "tiny", edit=None, evals=None, device_kind=None, step_time=0.1,
                 compile_time=5.0, extra_info=None, steps=None) -> str:
  """A finished run's workdir files: config.json, run_info.json (plan.describe, as the trainer writes it) and a
  synthetic metrics.jsonl. config: a name in configs/; evals: {eval set: [bpb at each eval]}, evals spaced evenly."""
  from tinyjax import plan, sharding  # noqa: PLC0415
  cfg = load_config(os.path.join(ROOT, "configs", f"{config}.py"))
  cfg.mesh.data = 1  # one device (the tests fake 8 CPU devices)
  if edit:
    edit(cfg)
  info = plan.describe(cfg, sharding.make_mesh(cfg.mesh), {"environment": {"XLA_FLAGS": "x"}, "jax_config": {}})
  if device_kind:
    info["mesh"]["device_kind"] = device_kind
  info.update(extra_info or {})
  total, per_step = info["num_train_steps"], info["tokens_per_step"]
  done = steps or total
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    f.write(cfg.to_json_best_effort(indent=2, sort_keys=True))
  with open(os.path.join(path, "run_info.json"), "w") as f:
    json.dump(info, f, sort_keys=True)
  evals = {"python_docs": [2.5, 2.0]} if evals is None else evals
  eval_steps = {name: [total * (i + 1) // len(v) for i in range(len(v))] for name, v in evals.items()}
  every = max(done // 10, 1)
  log_steps = {1, done, *range(every, done + 1, every)} | {s for v in eval_steps.values() for s in v if s <= done}
  with open(os.path.join(path, "metrics.jsonl"), "w") as f:
    for step in sorted(log_steps):
      row = {"step": step, "loss": 8.0 - 4.0 * step / total, "learning_rate": 0.02, "adam_lr": 0.004,
             "grad_norm": 1.0, "tokens": step * per_step, "training_time": compile_time + step_time * (step - 1)}
      if step > 1 and step_time:
        row["tokens_per_second"] = per_step / step_time
      f.write(json.dumps(row) + "\n")
      for name, values in evals.items():
        if step in eval_steps[name]:
          bpb = values[eval_steps[name].index(step)]
          f.write(json.dumps({"step": step, f"eval/{name}/bpb": bpb, f"eval/{name}/bpb_exact": bpb * 0.99,
                              f"eval/{name}/loss": bpb * 2.0, f"eval/{name}/tokens": 1000,
                              f"eval/{name}/bytes": 4000}) + "\n")
  return str(path)


# ---- data written without tinyjax ----

WORDS = ("the of and to in is was for on that with as by at from his an were are which this be also has or had first "
         "one their its new after who they two her she been other when time during there into school more may years "
         "naïve café 日本 — ✓ data model token cache shard").split()


def make_docs(seed: int, n: int, lo: int = 5, hi: int = 60) -> list[str]:
  """n documents of lo..hi random words (some not ASCII), each ending in one of three endings."""
  import numpy as np  # noqa: PLC0415
  rng = np.random.default_rng(seed)
  return [" ".join(rng.choice(WORDS, size=rng.integers(lo, hi))) + rng.choice([".", ".\n\nNext.", "!"])
          for _ in range(n)]


def write_corpus(directory, files: int = 3, docs: int = 150, seed: int = 0) -> list[str]:
  """`files` JSONL files of `docs` random-word documents each (a fast tokenizer and cache build); their paths."""
  os.makedirs(directory, exist_ok=True)
  paths = []
  for i in range(files):
    path = os.path.join(directory, f"part{i}.jsonl")
    with open(path, "w", encoding="utf-8") as f:
      f.writelines(json.dumps({"text": d}) + "\n" for d in make_docs(seed + i, docs, 20, 80))
    paths.append(path)
  return paths


def _zarr3_spec(path):
  """Levanter's jagged_array._get_spec: 2^27-element chunks, sharded in 2^18-element blosc(clevel 5) sub-chunks."""
  return {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)}, "metadata": {
      "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [134217728]}},
      "codecs": [{"name": "sharding_indexed", "configuration": {
          "chunk_shape": [262144], "codecs": [{"name": "blosc", "configuration": {"clevel": 5}}]}}]}}


def write_levanter_store(path, docs, dtype="int32"):
  """A Levanter JaggedArrayStore at path/input_ids/{offsets,data} written with tensorstore directly (not through
  tinyjax.data.cache); returns the flat token stream."""
  import numpy as np  # noqa: PLC0415
  import tensorstore as ts  # noqa: PLC0415
  off = ts.open(_zarr3_spec(f"{path}/input_ids/offsets"), create=True, dtype="int64", shape=[2**54]).result()
  dat = ts.open(_zarr3_spec(f"{path}/input_ids/data"), create=True, dtype=dtype, shape=[2**54]).result()
  flat = np.concatenate(docs).astype(dtype)
  dat[:len(flat)].write(flat).result()
  off[1:len(docs) + 1].write(np.cumsum([len(d) for d in docs])).result()
  off[0].write(len(docs)).result()
  return flat


def write_ledger(path, rows: int, tokens: int, tokenizer: str, vocab_size: int, append_bos: bool,
                 finished: bool = True, shards=("",), **extra) -> None:
  """Levanter's shard_ledger.json (CacheLedger) beside a store."""
  ledger = {"total_num_rows": rows, "shard_rows": {shards[0]: rows}, "is_finished": finished,
            "finished_shards": list(shards), "field_counts": {"input_ids": tokens},
            "metadata": {"preprocessor_metadata": {"tokenizer": tokenizer, "vocab_size": vocab_size,
                                                   "append_bos": append_bos, "append_eos": True}}, **extra}
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "shard_ledger.json"), "w") as f:
    json.dump(ledger, f)


# ---- a local Cloud Storage ----

def serve_gcs(port: int) -> None:
  """gcp-storage-emulator on 127.0.0.1:port, in memory, with the two things real GCS does that tensorstore needs
  (filled in the emulator's download handler, nothing else changed): an object's generation as `x-goog-generation`
  with every download (Orbax's OCDBT manifests need it), and suffix ranges `bytes=-N` (tensorstore reads a sharded
  zarr3 index from the end of the shard). Prints "ready", then serves until killed."""
  import threading  # noqa: PLC0415

  from gcp_storage_emulator import server  # noqa: PLC0415
  from gcp_storage_emulator.handlers import objects  # noqa: PLC0415
  download = objects.download

  def with_generation(request, response, storage, *args, **kwargs):
    try:
      bucket, name = request.params["bucket_name"], request.params["object_id"]
      obj = storage.get_file_obj(bucket, name)
      response["x-goog-generation"] = str(obj["generation"])
      response["x-goog-metageneration"] = str(obj["metageneration"])
      suffix = re.fullmatch(r"\s*bytes=-(\d+)\s*", request.get_header("range", None) or "")
      if suffix:  # the last N bytes -> the equivalent "start-" range the emulator understands
        start = max(len(storage.get_file(bucket, name)) - int(suffix.group(1)), 0)
        get_header = request.get_header
        request.get_header = lambda key, default=None: (f"bytes={start}-" if key.lower() == "range"
                                                        else get_header(key, default))
    except Exception:  # noqa: BLE001 - a missing object: the original handler answers 404
      pass
    return download(request, response, storage, *args, **kwargs)

  objects.download = with_generation  # objects.get (?alt=media, what tensorstore uses) calls it too
  for _, handlers in server.HANDLERS:
    for method, handler in list(handlers.items()):
      if handler is download:
        handlers[method] = with_generation
  srv = server.create_server("127.0.0.1", port, in_memory=True)
  srv.start()
  print("ready", flush=True)
  threading.Event().wait()


if __name__ == "__main__" and sys.argv[1:2] == ["gcs"]:
  serve_gcs(int(sys.argv[2]))
