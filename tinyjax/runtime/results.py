"""workdir/speedrun_results.json in Marin's per-run shape, from the files a run leaves (config, run_info, metrics).

Marin's `speedrun_results.json` is `{"runs": [{"run_info": {...}}]}` written with sort_keys
(github.com/marin-community/marin lib/marin/src/marin/speedrun/speedrun.py); the FLOPs fields follow Levanter's
flop_utils.py and Marin's SpeedrunConfig.compute_model_flops. tinyjax's own additions sit under the
`tinyjax` key so that the Marin fields keep Marin's meaning.

Chips: a JAX device is one chip on GPUs and on TPU v4/v5p/v5e/v6e (megacore), so num_chips = num_devices. On TPU
v2/v3 a JAX device is one TensorCore (2 per chip); flops.PEAK_FLOPS holds v3's peak per core (61.5e12), so there we
also count devices, which keeps training_hardware_flops = time x devices x per-device peak right. Unknown peaks
(CPUs) give null device_flops / training_hardware_flops / mfu and a note; no number is invented.

`python -m tinyjax.compare RUN` rewrites it for a finished run (write_results).
"""
from __future__ import annotations

import datetime
import json
import os

from tinyjax import flops
from tinyjax.runtime import metrics, workdir as workdirs

RESULTS_FILE = workdirs.RESULTS
PALOMA_C4_EN = "paloma/c4_en"  # the leaderboard's eval set: W&B summary key eval/paloma/c4_en/bpb
MARIN_BPB_KEY = f"eval/{PALOMA_C4_EN}/bpb"
PEAK_SOURCE = ("tinyjax.flops.PEAK_FLOPS: Marin lib/fray/src/fray/cluster/device_flops.py, "
               "Levanter DEFAULT_AVAILABLE_FLOPS (dense bf16 per chip)")
EVAL_FIELDS = ("loss", "bpb", "bpb_exact", "tokens", "bytes")
# run_info keys that speedrun_results.json carries under Marin names; any other key (e.g. versions, host, git)
# is copied as is into the tinyjax block.
_CONSUMED = {"model_size", "total_tokens", "model_flops", "flops_per_token", "num_train_steps", "mesh", "env",
             "optimizer_groups", "learning_rate", "adam_lr"}


def _load_json(path: str):
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON ({e})") from None


def eval_sets(rows: list[dict]) -> dict[str, dict]:
  """{name: last logged {loss, bpb, bpb_exact, tokens, bytes, step}} for every eval/<name>/bpb in the metrics."""
  out = {}
  for row in rows:
    for key in row:
      if key.startswith("eval/") and key.endswith("/bpb"):
        name = key[len("eval/"):-len("/bpb")]
        if name:  # not an aggregate such as eval/bpb
          out[name] = {"step": row["step"], **{f: row.get(f"eval/{name}/{f}") for f in EVAL_FIELDS}}
  return out


def _throughput(train_rows: list[dict]) -> tuple[float | None, float | None]:
  """(steady-state tokens/s after the first logged step, which carries the compile; tokens / training_time)."""
  if not train_rows or not train_rows[-1].get("training_time"):
    return None, None
  first, last = train_rows[0], train_rows[-1]
  overall = last["tokens"] / last["training_time"]
  if last["training_time"] <= first["training_time"]:
    return None, overall
  return (last["tokens"] - first["tokens"]) / (last["training_time"] - first["training_time"]), overall


def model_config(m: dict) -> dict:
  """config.json's model group under Levanter LlamaConfig field names (Marin's run_info.model_config)."""
  return {
      "activation_function": "silu", "hidden_dim": m["hidden_dim"], "intermediate_dim": m["intermediate_dim"],
      "num_layers": m["num_layers"], "num_heads": m["num_heads"], "num_kv_heads": m["num_kv_heads"],
      "head_dim": None, "seq_len": m["seq_len"], "layer_norm_epsilon": m["layer_norm_epsilon"],
      "tie_word_embeddings": m["tie_word_embeddings"], "use_qk_norm": m["use_qk_norm"], "use_bias": False,
      "use_layer_norm_weight": True, "rope": {"factor": 1.0, "theta": m["rope_theta"]},
      "gradient_checkpointing": m.get("remat") == "block", "scan_layers": False,  # tinyjax unrolls its layers
      "hybrid_norm": False, "input_embedding_norm": False,
  }


def train_config(cfg: dict, info: dict) -> dict:
  """config.json's train/optimizer groups as Marin's SimpleTrainConfig + optimizer_config (MuonConfig/AdamConfig)."""
  o, t = cfg["optimizer"], cfg["train"]
  opt = {k: o[k] for k in ("beta1", "beta2", "epsilon", "max_grad_norm", "weight_decay", "warmup", "decay",
                           "min_lr_ratio", "lr_schedule", "nesterov")}
  opt["learning_rate"] = info["learning_rate"]  # after the optional sqrt batch-size rule
  if o["name"] == "muon":
    opt.update({k: o.get(k) for k in ("momentum", "backend_steps", "muon_epsilon", "use_kimi_scaling",
                                      "coefficient_type", "adam_weight_decay")})
    opt["adam_lr"] = info["adam_lr"]
  return {
      "train_batch_size": t["train_batch_size"], "num_train_steps": info["num_train_steps"],
      "learning_rate": info["learning_rate"], "data_seed": t["data_seed"],
      "z_loss_weight": t["z_loss_weight"] or None, "steps_per_eval": t["steps_per_eval"],
      "max_eval_batches": t["max_eval_batches"] or None, "skip_bad_steps": t.get("skip_bad_steps", False),
      "optimizer_config": opt,
  }


def _timestamp(path: str) -> str:
  """Marin's "YYYY-MM-DD HH:MM:SS UTC", from when the run last wrote its metrics."""
  when = datetime.datetime.fromtimestamp(os.path.getmtime(path), datetime.timezone.utc)
  return when.strftime("%Y-%m-%d %H:%M:%S UTC")


def run_info(workdir: str) -> dict:
  """The run_info dict of speedrun_results.json for one workdir."""
  for name in (workdirs.CONFIG, workdirs.RUN_INFO):
    if not os.path.exists(os.path.join(workdir, name)):
      raise FileNotFoundError(f"{workdir}: not a tinyjax workdir (no {name})")
  cfg = _load_json(os.path.join(workdir, workdirs.CONFIG))
  info = _load_json(os.path.join(workdir, workdirs.RUN_INFO))
  try:
    return _run_info(workdir, cfg, info)
  except (KeyError, TypeError) as e:
    raise ValueError(f"{workdir}: config.json or run_info.json lacks a field the results need "
                     f"({type(e).__name__}: {e})") from None


def _run_info(workdir: str, cfg: dict, info: dict) -> dict:
  rows = metrics.read(workdir)
  train_rows = [r for r in rows if "loss" in r and "training_time" in r]
  evals = eval_sets(rows)
  mesh = info["mesh"]
  kind, devices = mesh["device_kind"], mesh["num_devices"]
  peak = flops.peak_flops(kind)
  training_time = train_rows[-1]["training_time"] if train_rows else None
  steady, overall = _throughput(train_rows)
  notes = []
  if peak is None:
    notes.append(f"peak FLOP/s of device_kind {kind!r} is unknown (not in tinyjax.flops.PEAK_FLOPS): "
                 "device_flops, training_hardware_flops and mfu are null")
  if PALOMA_C4_EN not in evals:
    notes.append(f"no {PALOMA_C4_EN} eval (eval sets: {', '.join(evals) or 'none'}): BPB is not comparable "
                 "with the Marin leaderboard")
  completed = train_rows[-1]["step"] if train_rows else 0
  if completed < info["num_train_steps"]:
    notes.append(f"incomplete run: {completed} of {info['num_train_steps']} steps; model_flops and total_tokens "
                 "are the planned run's")
  results = cfg.get("results", {})
  out = {
      "author": {"name": results.get("author", ""), "affiliation": results.get("affiliation", ""),
                 "url": results.get("url") or None},
      "description": results.get("description", ""),
      "model_config": model_config(cfg["model"]),
      "train_config": train_config(cfg, info),
      "tokenized_dataset": f"{', '.join(cfg['data']['train_urls'])} (tokenizer {cfg['data']['tokenizer']})",
      "resources": {"device_kind": kind, "num_devices": devices, "process_count": mesh["process_count"]},
      "model_size": info["model_size"], "total_tokens": info["total_tokens"], "model_flops": info["model_flops"],
      "model_flops_per_token": info["flops_per_token"],  # forward only, as Marin
      "num_devices": devices, "num_chips": devices, "device_flops": peak, "training_time": training_time,
      "training_hardware_flops": None if peak is None or training_time is None else training_time * devices * peak,
      "run_completion_timestamp": _timestamp(os.path.join(workdir, metrics.FILE) if rows else
                                             os.path.join(workdir, workdirs.RUN_INFO)),
      "wandb_run_link": None,
  }
  if PALOMA_C4_EN in evals:
    out[MARIN_BPB_KEY] = evals[PALOMA_C4_EN]["bpb"]  # the last eval, as Marin's W&B summary value
  out["tinyjax"] = {
      "eval_sets": evals, "comparable": PALOMA_C4_EN in evals, "notes": notes,
      "completed_steps": completed, "planned_steps": info["num_train_steps"],
      "final_train_loss": train_rows[-1]["loss"] if train_rows else None,
      "tokens_per_second": steady, "tokens_per_second_overall": overall,
      "mfu": None if steady is None else flops.mfu(steady, info["flops_per_token"], kind, devices),
      "device_flops_source": PEAK_SOURCE if peak is not None else None,
      "device_kind": kind, "vocab_size": cfg["model"]["vocab_size"], "optimizer": cfg["optimizer"]["name"],
      "environment": info.get("env"), "mesh": mesh,
      **{k: v for k, v in info.items() if k not in _CONSUMED},
  }
  return out


def write_results(workdir: str) -> dict:
  """Writes workdir/speedrun_results.json (process 0's job; the caller decides) and returns its content."""
  doc = {"runs": [{"run_info": run_info(workdir)}]}
  with open(os.path.join(workdir, RESULTS_FILE), "w") as f:
    json.dump(doc, f, indent=2, sort_keys=True)
  return doc
