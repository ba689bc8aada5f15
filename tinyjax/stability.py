"""The stability finder: one short run per (setting, LR), stopped at divergence; boundary, LR sensitivity, figure.

python -m tinyjax.stability --config=configs/NAME.py --lrs 3e-4,1e-3,... [--vary model.use_qk_norm=True,False]
    [--vary train.z_loss_weight=0,1e-4] [--steps N] [--adam-ratio R] [--workdir-root DIR] [--set key=value ...]
    [--report-only]

A setting is one combination of the --vary values. Each run is `python -m tinyjax.main` in its own workdir under the
root; a rerun skips finished runs (run_info.json status "completed" or "diverged", or this module's stability.json).
A run diverges when tinyjax stops it on a non-finite loss / grad norm (exit 3, a "diverged" row in metrics.jsonl),
or when a logged loss exceeds the first logged loss by --blowup-nats after the first --warm-fraction of the steps
(watched here while it runs; SIGTERM stops it). Wortsman et al. 2023 ("Small-scale proxies for large-scale
Transformer training instabilities", arXiv 2309.14322, sec. 2): LR sensitivity = mean over the LR grid of
min(final loss, initial loss) - the best final loss; a diverged run counts as its initial loss.
"""
from __future__ import annotations

import csv
import dataclasses
import importlib.util
import itertools
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time

from tinyjax import cli, errors
from tinyjax.launch import commands as C
from tinyjax.runtime import metrics, workdir as workdirs

RECORD = "stability.json"  # per-run record written here (the only file this module adds to a workdir)
SUMMARY = "stability_summary"  # <root>/stability_summary.{json,csv}
FIGURE = "lr_sensitivity.png"
POLL_S = 0.1  # new metrics.jsonl lines are read this often while a run trains (a tiny CPU step is ~25 ms)
_NONFINITE = re.compile(r"non-finite (.+?) at step (\d+)")


@dataclasses.dataclass(frozen=True)
class Run:
  setting: str  # "base" or "model.use_qk_norm=True,train.z_loss_weight=0"
  lr: float
  workdir: str
  overrides: tuple  # ("model.use_qk_norm=True", "optimizer.learning_rate=0.01", ...) for --config.<override>


# ---------------------------------------------------------------- the grid


def parse_lrs(text: str) -> list[float]:
  try:
    lrs = sorted({float(x) for x in text.split(",") if x.strip()})
  except ValueError:
    cli.fail(f"--lrs={text!r}: expected comma-separated numbers such as 3e-4,1e-3,3e-3")
  if not lrs or any(not math.isfinite(lr) or lr <= 0 for lr in lrs):
    cli.fail(f"--lrs={text!r}: every learning rate must be a finite number > 0")
  return lrs


def parse_vary(specs: list[str]) -> list[tuple[str, list[str]]]:
  """["model.use_qk_norm=True,False"] -> [("model.use_qk_norm", ["True", "False"])]."""
  out = []
  for spec in specs:
    key, _, values = spec.partition("=")
    vals = [v.strip() for v in values.split(",") if v.strip()]
    if not key or not vals:
      cli.fail(f"--vary {spec!r}: expected KEY=V1,V2,... such as model.use_qk_norm=True,False")
    out.append((key.strip(), vals))
  return out


def settings(varies: list[tuple[str, list[str]]]) -> list[dict]:
  """Every combination of the --vary values, in the order given ([{}] when nothing varies)."""
  keys = [k for k, _ in varies]
  return [dict(zip(keys, combo)) for combo in itertools.product(*[v for _, v in varies])]


def setting_name(setting: dict) -> str:
  return ",".join(f"{k}={v}" for k, v in setting.items()) or "base"


def run_name(setting: dict, lr: float) -> str:
  """use_qk_norm-True_lr-0.003: the launchers' one naming rule over the setting and the LR (repr: distinct LRs never
  collide)."""
  return C.run_name({**setting, "lr": repr(lr)})


def lr_overrides(lr: float, adam_ratio: float | None) -> list[str]:
  """optimizer.learning_rate (Muon's matrix LR, or AdamW's only LR); with adam_ratio, adam_lr = ratio x lr."""
  out = [f"optimizer.learning_rate={lr!r}"]
  if adam_ratio is not None:
    out.append(f"optimizer.adam_lr={lr * adam_ratio!r}")
  return out


def plan_runs(root: str, lrs, varies, sets, steps: int, adam_ratio) -> list[Run]:
  common = list(sets) + ([f"train.num_train_steps={steps}"] if steps else [])
  runs = []
  for setting in settings(varies):
    for lr in lrs:
      over = common + [f"{k}={v}" for k, v in setting.items()] + lr_overrides(lr, adam_ratio)
      runs.append(Run(setting_name(setting), lr, os.path.join(root, run_name(setting, lr)), tuple(over)))
  return runs


def check_keys(config_path: str, keys) -> None:
  """Fails (exit 2) on an override key the config does not declare, before any run starts."""
  spec = importlib.util.spec_from_file_location("_tinyjax_stability_config", config_path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = module.get_config()
  for key in keys:
    node = cfg
    for part in key.split("."):
      if not hasattr(node, "keys") or part not in node:
        cli.fail(f"unknown config key config.{key} (every key is declared in tinyjax/config.py)")
      node = node[part]


# ---------------------------------------------------------------- divergence


def losses(rows: list[dict]) -> list[tuple[int, float]]:
  return [(int(r["step"]), float(r["loss"])) for r in rows if "loss" in r and "event" not in r]


def nonfinite(rows: list[dict]) -> dict | None:
  """tinyjax's own stop: the "diverged" event row names the first bad step and the quantity."""
  for row in rows:
    if row.get("event") == "diverged":
      m = _NONFINITE.search(row.get("message", ""))
      step, what = (int(m.group(2)), m.group(1)) if m else (int(row["step"]), "loss or grad_norm")
      return {"step": step, "quantity": f"non-finite {what}", "message": row.get("message", "")}
  return None


def blowup(rows: list[dict], total_steps: int, nats: float, warm_fraction: float) -> dict | None:
  """The first logged loss > first logged loss + nats, after the first warm_fraction of the steps."""
  logged = losses(rows)
  if not logged:
    return None
  initial = logged[0][1]
  for step, loss in logged[1:]:
    if step > warm_fraction * total_steps and (loss > initial + nats or not math.isfinite(loss)):
      return {"step": step, "quantity": "loss-blowup",
              "message": f"loss {loss:.4f} > initial {initial:.4f} + {nats} nats at step {step}"}
  return None


def make_record(run: Run, rows: list[dict], total_steps: int, divergence: dict | None) -> dict:
  logged = losses(rows)
  finite = [(s, v) for s, v in logged if math.isfinite(v)]
  return {"setting": run.setting, "lr": run.lr, "status": "diverged" if divergence else "completed",
          "initial_loss": finite[0][1] if finite else None, "final_loss": finite[-1][1] if finite else None,
          "last_step": logged[-1][0] if logged else 0, "num_train_steps": total_steps, "divergence": divergence,
          "overrides": list(run.overrides)}


class Tail:
  """The whole lines appended to a growing JSONL file since the last read (a torn last line waits)."""

  def __init__(self, path: str):
    self.path, self.offset, self.rows = path, 0, []

  def read(self) -> list[dict]:
    if os.path.exists(self.path):
      with open(self.path, "rb") as f:
        f.seek(self.offset)
        chunk = f.read()
      whole = chunk[:chunk.rfind(b"\n") + 1]
      self.offset += len(whole)
      for line in whole.decode().splitlines():
        try:
          self.rows.append(json.loads(line))
        except json.JSONDecodeError:
          continue
    return self.rows


def _total_steps(workdir: str) -> int:
  info = workdirs.read_json(workdir, workdirs.RUN_INFO)
  return int(info.get("num_train_steps", 0)) if info else 0  # none yet: the run is still compiling


def finished(run: Run) -> dict | None:
  """The record of a finished run (ours, or rebuilt from tinyjax's completed/diverged run), else None."""
  record = workdirs.read_json(run.workdir, RECORD)
  if record is not None:
    return record
  status = workdirs.status(run.workdir)
  if status not in ("completed", "incomplete", "diverged"):
    return None
  rows = metrics.read(run.workdir)
  return make_record(run, rows, _total_steps(run.workdir), nonfinite(rows) if status == "diverged" else None)


# ---------------------------------------------------------------- running


def train(config_path: str, run: Run, nats: float, warm_fraction: float, env=None) -> dict:
  """Runs one LR to the end or to divergence (SIGTERM at a loss blow-up); writes and returns its record."""
  shutil.rmtree(run.workdir, ignore_errors=True)  # an unfinished earlier attempt (and its checkpoints) starts over
  os.makedirs(run.workdir)
  cmd = C.main_argv([f"--config={config_path}", f"--workdir={run.workdir}",
                     *[f"--config.{o}" for o in run.overrides]], sys.executable)
  with open(os.path.join(run.workdir, "train.log"), "w") as log:
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    stop, tail, total = None, Tail(os.path.join(run.workdir, metrics.FILE)), 0
    while proc.poll() is None:
      time.sleep(POLL_S)
      total = total or _total_steps(run.workdir)
      if stop is None and total:
        stop = blowup(tail.read(), total, nats, warm_fraction)
        if stop:
          proc.send_signal(signal.SIGTERM)  # tinyjax stops at the next step boundary (exit 75)
  rows = metrics.read(run.workdir)
  total = _total_steps(run.workdir)
  stop = stop or nonfinite(rows) or blowup(rows, total, nats, warm_fraction)
  if proc.returncode not in (0, errors.EXIT_DIVERGED, errors.EXIT_PREEMPTED) or (proc.returncode != 0 and stop is None):
    _failed(run, proc.returncode)
  record = make_record(run, rows, total, stop)
  with open(os.path.join(run.workdir, RECORD), "w") as f:
    json.dump(record, f, indent=2, sort_keys=True)
  return record


def _failed(run: Run, rc: int) -> None:
  with open(os.path.join(run.workdir, "train.log")) as f:
    lines = [line.strip() for line in f if line.strip()]
  errors = [line for line in lines if line.startswith("tinyjax: error:")]
  if errors:
    cli.fail(errors[-1][len("tinyjax: error: "):])
  cli.fail(f"the run in {run.workdir} failed (exit code {rc}): {lines[-1] if lines else 'no output'}; "
           f"see {os.path.join(run.workdir, 'train.log')}")


# ---------------------------------------------------------------- the report


def capped_loss(record: dict, initial: float) -> float:
  """Wortsman et al.: min(final loss, initial loss); a diverged run counts as its initial loss."""
  if record["status"] == "diverged" or record["final_loss"] is None:
    return initial
  return min(record["final_loss"], initial)


def summarize_setting(name: str, records: list[dict], safety: float) -> dict:
  """Per setting: capped final loss per LR, boundary, LR sensitivity, recommended LR (<= safety x boundary)."""
  records = sorted(records, key=lambda r: r["lr"])
  inits = sorted(r["initial_loss"] for r in records if r["initial_loss"] is not None)
  fallback = inits[len(inits) // 2] if inits else float("nan")  # a run that died before logging any loss
  runs = []
  for r in records:
    initial = r["initial_loss"] if r["initial_loss"] is not None else fallback
    runs.append({**r, "capped_loss": capped_loss(r, initial)})
  capped = [r["capped_loss"] for r in runs]
  best = min(capped)
  diverged = [r for r in runs if r["status"] == "diverged"]
  boundary = None
  if diverged:
    d = diverged[0]
    boundary = {"lr": d["lr"], "step": d["divergence"]["step"], "quantity": d["divergence"]["quantity"]}
  limit = boundary["lr"] * safety if boundary else math.inf
  ok = [r for r in runs if r["status"] == "completed" and r["lr"] <= limit]
  return {"setting": name, "runs": runs, "boundary": boundary, "best_loss": best,
          "best_lr": runs[capped.index(best)]["lr"], "lr_sensitivity": sum(capped) / len(capped) - best,
          "recommended_lr": ok[-1]["lr"] if ok else None}


def summarize(records: list[dict], safety: float = 0.5) -> dict:
  order = list(dict.fromkeys(r["setting"] for r in records))
  return {"safety": safety,
          "settings": [summarize_setting(s, [r for r in records if r["setting"] == s], safety) for s in order]}


def _fmt(x, spec=".4f") -> str:
  return "-" if x is None else format(x, spec)


def table(summary: dict) -> str:
  lines = []
  for s in summary["settings"]:
    b = s["boundary"]
    lines.append(f"{s['setting']}: LR sensitivity {s['lr_sensitivity']:.4f} | best {s['best_loss']:.4f} at lr "
                 f"{s['best_lr']:g} | boundary " + (f"lr {b['lr']:g} ({b['quantity']} at step {b['step']})"
                                                    if b else "none in the grid")
                 + f" | recommended lr {_fmt(s['recommended_lr'], 'g')}")
    lines.append(f"  {'lr':>10} {'status':>9} {'initial':>8} {'final':>8} {'capped':>8} {'step':>6}  divergence")
    for r in s["runs"]:
      d = r["divergence"]
      lines.append(f"  {r['lr']:>10g} {r['status']:>9} {_fmt(r['initial_loss']):>8} {_fmt(r['final_loss']):>8} "
                   f"{r['capped_loss']:>8.4f} {r['last_step']:>6}  " + (f"{d['quantity']} at step {d['step']}"
                                                                       if d else ""))
  return "\n".join(lines)


def write_summary(summary: dict, root: str) -> None:
  with open(os.path.join(root, SUMMARY + ".json"), "w") as f:
    json.dump(summary, f, indent=2, sort_keys=True)
  fields = ["setting", "lr", "status", "initial_loss", "final_loss", "capped_loss", "last_step", "num_train_steps",
            "diverged_step", "quantity"]
  with open(os.path.join(root, SUMMARY + ".csv"), "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
    w.writeheader()
    for s in summary["settings"]:
      for r in s["runs"]:
        d = r["divergence"] or {}
        w.writerow({**r, "diverged_step": d.get("step", ""), "quantity": d.get("quantity", "")})


def plot_lr(summary: dict, out_png: str) -> None:
  """The small-scale-proxies figure: capped final loss against LR (log x), one curve per setting, x = diverged."""
  import matplotlib  # noqa: PLC0415 - only the figure needs it
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  fig, ax = plt.subplots(figsize=(6.4, 4.2))
  for s in summary["settings"]:
    runs = s["runs"]
    line, = ax.plot([r["lr"] for r in runs], [r["capped_loss"] for r in runs], marker="o",
                    label=f"{s['setting']} (LR sensitivity {s['lr_sensitivity']:.3f})")
    bad = [r for r in runs if r["status"] == "diverged"]
    ax.scatter([r["lr"] for r in bad], [r["capped_loss"] for r in bad], marker="x", s=90, color=line.get_color(),
               zorder=3)
  ax.scatter([], [], marker="x", color="gray", label="diverged (counted as its initial loss)")
  ax.set_xscale("log")
  ax.set_xlabel("learning rate")
  ax.set_ylabel("final train loss (min with initial loss)")
  ax.set_title("LR sensitivity (Wortsman et al. 2023)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(out_png, dpi=120)
  plt.close(fig)


def read_records(root: str) -> list[dict]:
  """Every stability.json under root (a --report-only run over whatever has finished)."""
  out = []
  for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
    path = os.path.join(root, name, RECORD)
    if os.path.exists(path):
      with open(path) as f:
        out.append(json.load(f))
  return out


# ---------------------------------------------------------------- command line


def parse_args(argv: list[str]):
  p = cli.ArgParser(prog="python -m tinyjax.stability", description=__doc__.splitlines()[0])
  p.add_argument("--config", required=True, help="configs/NAME.py")
  p.add_argument("--lrs", help="comma-separated peak LRs (Muon: optimizer.learning_rate)")
  p.add_argument("--vary", action="append", default=[], help="KEY=V1,V2: one curve per value (repeatable)")
  p.add_argument("--set", action="append", default=[], help="KEY=VALUE for every run (repeatable)")
  p.add_argument("--steps", type=int, default=0, help="train.num_train_steps of every run (0 = the config's)")
  p.add_argument("--adam-ratio", type=float, default=None, help="Muon: optimizer.adam_lr = ratio x LR (0.2)")
  p.add_argument("--workdir-root", default=None, help="runs go in ROOT/<name> (default workdir/stability/<config>)")
  p.add_argument("--blowup-nats", type=float, default=1.0, help="diverged: loss > first logged loss + this")
  p.add_argument("--warm-fraction", type=float, default=0.1, help="... after this fraction of the steps")
  p.add_argument("--safety", type=float, default=0.5, help="recommend at most this x the boundary LR")
  p.add_argument("--report-only", action="store_true", help="summarize the finished runs under the root")
  return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
  a = parse_args(sys.argv[1:] if argv is None else argv)
  if not os.path.isfile(a.config):
    cli.fail(f"--config={a.config}: no such config file (see configs/)")
  root = a.workdir_root or os.path.join("workdir", "stability", os.path.splitext(os.path.basename(a.config))[0])
  if a.report_only:
    records = read_records(root)
    if not records:
      cli.fail(f"--workdir-root={root}: no finished stability runs there")
  else:
    if not a.lrs:
      cli.fail("--lrs is required (e.g. --lrs 3e-4,1e-3,3e-3,1e-2,3e-2,1e-1,3e-1) unless --report-only")
    if a.steps < 0 or a.blowup_nats <= 0 or not 0 <= a.warm_fraction < 1 or not 0 < a.safety <= 1:
      cli.fail("--steps must be >= 0, --blowup-nats > 0, --warm-fraction in [0, 1), --safety in (0, 1]")
    varies, sets = parse_vary(a.vary), list(a.set)
    if any("=" not in s for s in sets):
      cli.fail(f"--set {next(s for s in sets if '=' not in s)!r}: expected KEY=VALUE")
    runs = plan_runs(root, parse_lrs(a.lrs), varies, sets, a.steps, a.adam_ratio)
    check_keys(a.config, {o.split("=", 1)[0] for o in runs[0].overrides} | {k for k, _ in varies})
    records = [_one(a, run, i, len(runs)) for i, run in enumerate(runs)]
  summary = {"config": a.config, "root": root, "blowup_nats": a.blowup_nats, "warm_fraction": a.warm_fraction,
             **summarize(records, a.safety)}
  os.makedirs(root, exist_ok=True)
  write_summary(summary, root)
  plot_lr(summary, os.path.join(root, FIGURE))
  print(table(summary))
  print(f"wrote {os.path.join(root, SUMMARY)}.json/.csv and {os.path.join(root, FIGURE)}", flush=True)
  return summary


def _one(a, run: Run, i: int, n: int) -> dict:
  record = finished(run)
  what = "done earlier"
  if record is None:
    t0 = time.time()
    record = train(a.config, run, a.blowup_nats, a.warm_fraction)
    what = f"{time.time() - t0:.0f}s"
  d = record["divergence"]
  print(f"[{i + 1}/{n}] {run.setting} lr {run.lr:g}: {record['status']}"
        + (f" ({d['quantity']} at step {d['step']})" if d else f", final loss {_fmt(record['final_loss'])}")
        + f" [{what}]", flush=True)
  return record


if __name__ == "__main__":
  main()
