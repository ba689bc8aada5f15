"""Our runs next to the Marin speedrun leaderboard: same model size and nearest in model FLOPs, on Marin's metrics.

python -m tinyjax.compare WORKDIR [WORKDIR ...] [--leaderboard FILE_OR_DIR_OR_URL ...] [--near N] [--json]

Without --leaderboard: the published table when it answers within TIMEOUT_S, else the snapshot bundled with tinyjax
(tinyjax/reference/marin_runs.json); one line on stderr says which, and the snapshot's commit and date.
Leaderboard formats (Marin's lib/marin/src/marin/speedrun/ and marin-community/speedrun), normalised to one row shape:
  * the official table `data/runs.json` of marin-community/speedrun: a list of rows (run_name, model_size,
    model_flops, training_hardware_flops, training_time, eval_paloma_c4_en_bpb, ...);
  * an object with a `runs` list of such rows (the bundled tinyjax/reference/marin_leaderboard.json:
    training_time_s, total_tokens, hardware, num_chips too);
  * per-run `speedrun_results.json` files ({"runs": [{"run_info": {...}}]}), given as files or a directory
    (searched recursively, as Marin's create_leaderboard.py globs experiments/speedrun/**/speedrun_results.json).
Only Paloma c4_en BPB is the leaderboard's metric: our runs evaluated on another set are listed as not comparable,
with their neighbours but no BPB difference.
Leaderboard rows whose figures contradict each other are flagged (`flags`; `!` in the table), not dropped: an implied
MFU above 100% (model FLOPs / (training_time x chips x peak)) or hardware FLOPs below model FLOPs (Marin issue #1767:
a 72 s training time from sampled W&B history), hardware FLOPs that imply another chip count, a chip count that does
not match the hardware name (before Marin PR #1756 a v5p-32 counted as 32 chips; it has 16), and total_tokens that
differ from train_batch_size x seq_len x num_train_steps.
"""
from __future__ import annotations

import json
import math
import os
import re
import sys
import urllib.request

from tinyjax import cli, flops, reference
from tinyjax.runtime import results

DEFAULT_URL = "https://raw.githubusercontent.com/marin-community/speedrun/main/data/runs.json"
TIMEOUT_S = 10  # for the published table; an offline machine fails at once (DNS) or after this
NUMBER, INTEGER, TEXT = (int, float), (int,), (str,)
# normalised field: (accepted source names, types, required)
TABLE_FIELDS = {
    "run_name": (("run_name",), TEXT, True),
    "model_size": (("model_size",), INTEGER, True),
    "model_flops": (("model_flops",), NUMBER, True),
    "bpb": (("eval_paloma_c4_en_bpb", results.MARIN_BPB_KEY), NUMBER, True),
    "training_hardware_flops": (("training_hardware_flops",), NUMBER, False),
    "training_time": (("training_time", "training_time_s"), NUMBER, False),
    "total_tokens": (("total_tokens",), INTEGER, False),
    "num_chips": (("num_chips",), INTEGER, False),
    "hardware": (("hardware",), TEXT, False),
    "device_flops": (("device_flops_per_chip", "device_flops"), NUMBER, False),  # peak FLOP/s per chip
    "train_batch_size": (("train_batch_size",), INTEGER, False),
    "seq_len": (("seq_len",), INTEGER, False),
    "num_train_steps": (("num_train_steps",), INTEGER, False),
}
# TPU names count TensorCores (v2, v3, v4, v5p: 2 per chip; a v5p-32 is 16 chips) or chips (v5e, v6e), per the Cloud
# TPU docs' accelerator types; peaks per chip from tinyjax.flops.PEAK_FLOPS (v2/v3: per core there, so none here).
_TPU_NAME = re.compile(r"\bv(\d)([a-z]*)-(\d+)\b")
_GPU_COUNT = re.compile(r"^\s*(\d+)\s*x\s")
_TPU_PEAK_KIND = {"4": "TPU v4", "5p": "TPU v5p", "5litepod": "TPU v5e", "5e": "TPU v5e", "6e": "TPU v6"}


class LeaderboardError(ValueError):
  """A leaderboard source that cannot be used; the message names the source and what is wrong."""


def _field(row: dict, name: str, where: str, per_run: bool):
  keys, types, required = TABLE_FIELDS[name]
  key = next((k for k in keys if k in row), None)
  value = None if key is None else row[key]
  if value is None:
    if required:  # named as the format spells it: runs.json's flat name, or the per-run file's W&B key
      raise LeaderboardError(f"{where}: missing field {keys[-1] if per_run else keys[0]!r}")
    return None
  if isinstance(value, bool) or not isinstance(value, types):
    kind = "a number" if types is NUMBER else "an integer" if types is INTEGER else "a string"
    raise LeaderboardError(f"{where}: field {key!r} must be {kind}, got {type(value).__name__} {value!r}")
  if name == "model_flops" and not value > 0:
    raise LeaderboardError(f"{where}: field 'model_flops' must be > 0, got {value!r}")
  return value


def _hardware(info: dict) -> str | None:
  """'1x H200' / 'v5p-32' from a per-run file's resources (Marin's GPU or TPU resource config)."""
  res = info.get("resources") or {}
  if res.get("accelerator_type") or res.get("device_kind"):
    return f"{res.get('gpu_count') or res.get('num_devices') or 1}x {res.get('accelerator_type') or res['device_kind']}"
  return res.get("tpu_type")


def normalise(row, where: str, run_name: str | None = None) -> dict:
  """One leaderboard row (table row or per-run run_info) -> {run_name, model_size, model_flops, bpb, ...}."""
  if not isinstance(row, dict):
    raise LeaderboardError(f"{where}: expected an object, got {type(row).__name__}")
  if run_name is not None:  # a per-run run_info: the name comes from its path; batch/steps/seq_len are nested
    train, model = row.get("train_config") or {}, row.get("model_config") or {}
    row = {**row, "run_name": run_name, "hardware": _hardware(row), "seq_len": model.get("seq_len"),
           **{k: train.get(k) for k in ("train_batch_size", "num_train_steps")}}
  out = {name: _field(row, name, where, run_name is not None) for name in TABLE_FIELDS}
  return {**out, "flags": contradictions(out)}


def named_chips(hardware: str | None) -> int | None:
  """Chips a hardware name stands for: 'TPU v5p-32' 16, 'v4-128' 64, 'TPU v5litepod-64 (v5e)' 64, '8x H200' 8."""
  tpu = _TPU_NAME.search(hardware or "")
  if tpu:
    cores_per_chip = 1 if tpu.group(2) in ("e", "litepod") else 2
    return int(tpu.group(3)) // cores_per_chip
  gpus = _GPU_COUNT.match(hardware or "")
  return int(gpus.group(1)) if gpus else None


def _peak(row: dict) -> float | None:
  if row["device_flops"]:
    return row["device_flops"]
  tpu = _TPU_NAME.search(row["hardware"] or "")
  if tpu:
    kind = _TPU_PEAK_KIND.get(tpu.group(1) + tpu.group(2))
    return flops.peak_flops(kind) if kind else None
  return flops.peak_flops(row["hardware"]) if row["hardware"] else None


def contradictions(r: dict) -> list[str]:
  """What a row's own figures say against each other (empty when they agree, or cannot be checked)."""
  named, peak = named_chips(r["hardware"]), _peak(r)
  time_s, hw, out = r["training_time"], r["training_hardware_flops"], []
  if r["num_chips"] and named and r["num_chips"] != named:
    out.append(f"num_chips {r['num_chips']}, but {r['hardware']} is {named} chips")
  chips = r["num_chips"] or named
  mfu = r["model_flops"] / (time_s * chips * peak) if time_s and chips and peak else None
  if mfu is not None and mfu > 1:
    out.append(f"implied MFU {mfu:.0%} > 100%: model FLOPs {r['model_flops']:.3g} in {time_s:.0f} s on {chips} chips "
               f"of {peak / 1e12:g} TFLOP/s")
  elif hw is not None and hw < r["model_flops"]:
    out.append(f"training_hardware_flops {hw:.3g} < model_flops {r['model_flops']:.3g}")
  if hw and time_s and peak and chips and abs(hw / (time_s * peak) - chips) > 0.01 * chips:
    out.append(f"training_hardware_flops = training_time x {hw / (time_s * peak):.3g} chips x peak, not {chips} chips")
  steps = [r[k] for k in ("train_batch_size", "seq_len", "num_train_steps")]
  if r["total_tokens"] and all(steps) and r["total_tokens"] != math.prod(steps):
    out.append(f"total_tokens {r['total_tokens']:,} != train_batch_size x seq_len x num_train_steps = "
               f"{' x '.join(map(str, steps))} = {math.prod(steps):,}")
  return out


def _per_run_name(path: str, root: str | None) -> str:
  """Marin's run_name: the results file's directory relative to the searched root (or the file's own stem)."""
  base = os.path.basename(path)
  if base != results.RESULTS_FILE:
    return base.removesuffix(".json").removesuffix(".speedrun_results")
  folder = os.path.dirname(path if path.startswith(("http://", "https://")) else os.path.abspath(path))
  return os.path.relpath(folder, root) if root else os.path.basename(folder)


def parse(doc, source: str, root: str | None = None) -> list[dict]:
  """A loaded JSON document of any supported format -> normalised rows."""
  runs = doc.get("runs") if isinstance(doc, dict) else doc
  if not isinstance(runs, list):
    raise LeaderboardError(f"{source}: expected a list of runs (runs.json) or an object with a 'runs' list, "
                           f"got {type(doc).__name__}" + (" without 'runs'" if isinstance(doc, dict) else ""))
  if not runs:
    raise LeaderboardError(f"{source}: no runs")
  if isinstance(runs[0], dict) and "run_related_info" in runs[0]:
    raise LeaderboardError(f"{source}: the April-2025 per-run format (run_related_info/run_stats) is not supported")
  if isinstance(runs[0], dict) and "run_info" in runs[0]:  # per-run speedrun_results.json
    name = _per_run_name(source, root)
    return [normalise(r.get("run_info") if isinstance(r, dict) else r, f"{source}: runs[{i}].run_info",
                      name if len(runs) == 1 else f"{name}[{i}]") for i, r in enumerate(runs)]
  return [normalise(r, f"{source}: runs[{i}]" + (f" ({r['run_name']})" if isinstance(r, dict) and
                                                 isinstance(r.get("run_name"), str) else ""))
          for i, r in enumerate(runs)]


def _read(source: str, timeout: float = 30, hint: str = "; pass --leaderboard FILE to work offline") -> str:
  if source.startswith(("http://", "https://")):
    try:
      with urllib.request.urlopen(source, timeout=timeout) as response:
        return response.read().decode()
    except OSError as e:
      raise LeaderboardError(f"{source}: cannot fetch ({e}){hint}") from None
  if not os.path.exists(source):
    raise LeaderboardError(f"{source}: no such file or directory")
  try:
    with open(source) as f:
      return f.read()
  except OSError as e:
    raise LeaderboardError(f"{source}: cannot read ({e.strerror or e})") from None


def _load_one(source: str, root: str | None = None) -> list[dict]:
  try:
    doc = json.loads(_read(source))
  except json.JSONDecodeError as e:
    raise LeaderboardError(f"{source}: not valid JSON ({e})") from None
  return parse(doc, source, root)


def load_leaderboard(sources: list[str]) -> list[dict]:
  """Rows from files, directories of per-run speedrun_results.json files, and URLs (in order)."""
  rows = []
  for source in sources:
    if os.path.isdir(source):
      found = sorted(os.path.join(d, results.RESULTS_FILE) for d, _, files in os.walk(source)
                     if results.RESULTS_FILE in files)
      if not found:
        raise LeaderboardError(f"{source}: no {results.RESULTS_FILE} files under this directory")
      for path in found:
        rows += _load_one(path, root=source)
    else:
      rows += _load_one(source)
  return rows


def default_leaderboard() -> tuple[list[dict], str]:
  """The published table if it answers within TIMEOUT_S, else the bundled snapshot; and a line saying which."""
  try:
    rows = parse(json.loads(_read(DEFAULT_URL, timeout=TIMEOUT_S, hint="")), DEFAULT_URL)
    return rows, f"leaderboard: the published table {DEFAULT_URL} ({len(rows)} runs)"
  except (LeaderboardError, json.JSONDecodeError, OSError, ValueError) as e:  # offline, or a page that is not the table
    why = str(e).removeprefix(f"{DEFAULT_URL}: ")
    rows = load_leaderboard([reference.RUNS])
    return rows, (f"leaderboard: {DEFAULT_URL} not used ({why}); the bundled snapshot "
                  f"{reference.snapshot_line()}")


def load_ours(workdir: str) -> dict:
  """A workdir's results (writing speedrun_results.json first if missing) as a row + which eval set its BPB is on."""
  path = os.path.join(workdir, results.RESULTS_FILE)
  try:
    if os.path.exists(path):
      info = json.loads(_read(path))["runs"][0]["run_info"]
    else:
      info = results.write_results(workdir)["runs"][0]["run_info"]
    evals = info["tinyjax"]["eval_sets"]
  except (KeyError, IndexError, TypeError) as e:
    raise ValueError(f"{path}: not a tinyjax speedrun_results.json ({type(e).__name__}: {e})") from None
  eval_set = results.PALOMA_C4_EN if results.PALOMA_C4_EN in evals else next(iter(evals), None)
  return {"run_name": os.path.basename(os.path.normpath(workdir)), "workdir": workdir,
          **{k: info[k] for k in ("model_size", "model_flops", "training_hardware_flops", "training_time",
                                  "total_tokens", "num_chips")},
          "bpb": evals[eval_set]["bpb"] if eval_set else None, "hardware": _hardware(info),
          "comparable": eval_set == results.PALOMA_C4_EN, "eval_set": eval_set}


def _distance(a: float, b: float) -> float:
  return abs(math.log10(a / b))


def neighbours(ours: dict, board: list[dict], near: int) -> list[dict]:
  """Marin rows of the same model_size plus the `near` nearest in model FLOPs (log distance), nearest first."""
  by_flops = sorted(board, key=lambda r: (_distance(ours["model_flops"], r["model_flops"]), r["run_name"]))
  nearest = {id(r) for r in by_flops[:near]}
  out = []
  for r in by_flops:
    match = [m for m, ok in (("size", r["model_size"] == ours["model_size"]), ("flops", id(r) in nearest)) if ok]
    if match:
      out.append({**r, "match": "+".join(match),
                  "log10_flops_distance": _distance(ours["model_flops"], r["model_flops"]),
                  "flops_ratio": ours["model_flops"] / r["model_flops"],
                  "delta_bpb": ours["bpb"] - r["bpb"] if ours["comparable"] else None})
  return out


def compare(workdirs: list[str], board: list[dict], near: int) -> list[dict]:
  return [{"run": ours, "neighbours": neighbours(ours, board, near)} for ours in map(load_ours, workdirs)]


def _si(x, unit="") -> str:
  if x is None:
    return "-"
  for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
    if abs(x) >= scale * 0.9995:  # so that 999,948,288 reads 1B, not 1e+03M
      return f"{x / scale:.3g}{suffix}{unit}"
  return f"{x:.3g}{unit}"


def _ratio(x: float) -> str:
  return f"{x:.3g}" if 0.01 <= x < 1000 else f"{x:.2e}"


def _cells(r: dict, match: str) -> list[str]:
  hw = r["hardware"] or (f"{r['num_chips']} chips" if r["num_chips"] else "-")
  delta = r.get("delta_bpb")
  return [r["run_name"], match, _si(r["model_size"]), "-" if r["bpb"] is None else f"{r['bpb']:.4f}", "-" if delta is None else f"{delta:+.4f}",
          f"{r['model_flops']:.3g}", _ratio(r.get("flops_ratio", 1.0)),
          "-" if r["training_hardware_flops"] is None else f"{r['training_hardware_flops']:.3g}",
          _si(r["total_tokens"]), "-" if r["training_time"] is None else f"{r['training_time']:.0f}s", hw]


HEADER = ["run", "match", "params", "c4_en BPB", "ΔBPB", "model FLOPs", "FLOPs ratio", "HW FLOPs", "tokens",
          "time", "hardware"]


def table(comparisons: list[dict], board: list[dict] = ()) -> str:
  """One text table: each of our runs, then its Marin neighbours (ΔBPB = ours - theirs; < 0: ours is better); rows
  whose figures contradict each other end in `!` with the reasons below (and how many of the board's rows do)."""
  lines, notes, seen = [HEADER], [], set()
  for c in comparisons:
    ours = c["run"]
    lines.append(_cells(ours, "ours"))
    if not ours["comparable"]:
      lines[-1][3] += "*"
      notes.append(f"* {ours['run_name']}: BPB is on {ours['eval_set'] or 'no eval set'}, not "
                   f"{results.PALOMA_C4_EN}: not comparable with the leaderboard (no ΔBPB)")
    for r in c["neighbours"]:
      lines.append(_cells({**r, "run_name": "  " + r["run_name"] + ("!" if r["flags"] else "")}, r["match"]))
      if r["flags"] and r["run_name"] not in seen:
        seen.add(r["run_name"])
        notes.append(f"! {r['run_name']}: " + "; ".join(r["flags"]))
    lines.append([""] * len(HEADER))
  widths = [max(len(row[i]) for row in lines) for i in range(len(HEADER))]
  text = ["  ".join(cell.ljust(w) if i < 2 or i == len(HEADER) - 1 else cell.rjust(w)
                    for i, (cell, w) in enumerate(zip(row, widths))).rstrip() for row in lines]
  flagged = [r["run_name"] for r in board if r["flags"]]
  if flagged:
    notes.append(f"! {len(flagged)} of {len(board)} leaderboard rows have figures that contradict each other "
                 f"(--json lists them): {', '.join(flagged[:5])}{' ...' if len(flagged) > 5 else ''}")
  legend = ("ΔBPB = ours - row (< 0: ours is lower); FLOPs ratio = our model FLOPs / row's; match: size = same "
            "model_size, flops = among the nearest in model FLOPs")
  return "\n".join(text[:1] + ["-" * len(text[0])] + text[1:-1] + notes + [legend])


def main(argv: list[str]) -> None:
  p = cli.ArgParser(prog="python -m tinyjax.compare", description=__doc__.splitlines()[0])
  p.add_argument("workdirs", nargs="+", metavar="WORKDIR")
  p.add_argument("--leaderboard", action="append", metavar="FILE_OR_DIR_OR_URL",
                 help=f"repeatable; default: {DEFAULT_URL}, or when that cannot be read in {TIMEOUT_S} s the bundled "
                      f"snapshot ({reference.snapshot_line()})")
  p.add_argument("--near", type=int, default=3, help="Marin runs nearest in model FLOPs per run (default 3)")
  p.add_argument("--json", action="store_true", help="machine-readable output")
  args = p.parse_args(argv)
  if args.near < 0:
    cli.fail(f"--near={args.near}: must be >= 0")
  try:
    board, used = (load_leaderboard(args.leaderboard), None) if args.leaderboard else default_leaderboard()
    comparisons = compare(args.workdirs, board, args.near)
  except (LeaderboardError, OSError, ValueError) as e:
    cli.fail(str(e))
  if used:
    print(used, file=sys.stderr)
  if args.json:
    flagged = [{"run_name": r["run_name"], "flags": r["flags"]} for r in board if r["flags"]]
    print(json.dumps({"leaderboard": args.leaderboard or [used.removeprefix("leaderboard: ")],
                      "leaderboard_runs": len(board),
                      "flagged_rows": flagged, "comparisons": comparisons}, indent=2, allow_nan=False, default=str))
  else:
    print(table(comparisons, board))


if __name__ == "__main__":
  main(sys.argv[1:])
