"""Does an environment setting change training? Run the same config twice, in fresh processes, and compare.

python -m tinyjax.envdiff --config=configs/tiny.py --a env.xla_python_client_preallocate=true \
    --b env.xla_python_client_preallocate=false [--steps 20] [--out DIR] [-- extra --config.k=v ...]

A KEY=VALUE whose KEY is UPPER_CASE is an environment variable of that side's process (e.g. XLA_FLAGS=...);
otherwise it is a config override (--config.KEY=VALUE). Both sides log every step (loss and parameter norm) and
end with a SHA-256 of the final parameters. The report gives the first step whose loss differs, the largest
absolute and relative differences of loss and parameter norm, and whether the runs are bitwise identical; it is
printed as a table and written to OUT/envdiff.json.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import numpy as np

from tinyjax import cli, metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _side(settings: list[str]) -> tuple[dict, list[str]]:
  env, overrides = {}, []
  for item in settings:
    if "=" not in item:
      cli.fail(f"{item!r} is not KEY=VALUE")
    key, value = item.split("=", 1)
    if key.isupper():
      env[key] = value
    else:
      overrides.append(f"--config.{key}={value}")
  return env, overrides


def run_side(config: str, settings: list[str], steps: int, workdir: str, extra: list[str]) -> dict:
  """One fresh training process; returns its per-step rows."""
  env_vars, overrides = _side(settings)
  cmd = [sys.executable, "-m", "tinyjax.main", f"--config={config}", f"--workdir={workdir}",
         f"--config.train.num_train_steps={steps}", "--config.train.log_every=1",
         f"--config.train.steps_per_eval={steps}", "--config.checkpoint.enabled=False", *extra, *overrides]
  proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, **env_vars}, capture_output=True, text=True)
  if proc.returncode != 0:
    cli.fail(f"the run with {' '.join(settings) or 'no settings'} failed (exit {proc.returncode}): "
          f"{(proc.stderr.strip().splitlines() or ['?'])[-1]}")
  rows = metrics.read(workdir)
  return {"loss": {r["step"]: r["loss"] for r in rows if "loss" in r},
          "param_norm": {r["step"]: r["param_norm"] for r in rows if "param_norm" in r},
          "param_sha256": next((r["param_sha256"] for r in rows if "param_sha256" in r), None)}


def compare(a: dict, b: dict) -> dict:
  """Step-by-step comparison of two runs' rows (see run_side)."""
  report = {"steps": sorted(set(a["loss"]) & set(b["loss"]))}
  for key in ("loss", "param_norm"):
    x = np.array([a[key][s] for s in report["steps"]], np.float64)
    y = np.array([b[key][s] for s in report["steps"]], np.float64)
    diff = np.abs(x - y)
    differs = [s for s, d in zip(report["steps"], diff) if d != 0 or np.isnan(d)]
    report[key] = {"first_differing_step": differs[0] if differs else None,
                   "max_abs_diff": float(np.nanmax(diff)) if len(diff) else 0.0,
                   "max_rel_diff": float(np.nanmax(diff / np.maximum(np.abs(x), 1e-30))) if len(diff) else 0.0}
  report["final_params_identical"] = a["param_sha256"] == b["param_sha256"]
  report["bitwise_identical"] = (report["final_params_identical"] and a["loss"] == b["loss"]
                                 and a["param_norm"] == b["param_norm"])
  return report


def table(report: dict, a: list[str], b: list[str]) -> str:
  lines = [f"A: {' '.join(a) or '(as is)'}", f"B: {' '.join(b) or '(as is)'}",
           f"{'quantity':<12} {'first diff step':>15} {'max |A-B|':>12} {'max rel':>10}"]
  for key in ("loss", "param_norm"):
    r = report[key]
    lines.append(f"{key:<12} {str(r['first_differing_step'] or '-'):>15} {r['max_abs_diff']:>12.3e} "
                 f"{r['max_rel_diff']:>10.3e}")
  lines.append(f"final params identical: {report['final_params_identical']}; "
               f"bitwise identical run: {report['bitwise_identical']} ({len(report['steps'])} steps)")
  return "\n".join(lines)


def main(argv=None) -> dict:
  parser = cli.ArgParser(prog="python -m tinyjax.envdiff", description=__doc__.splitlines()[0])
  parser.add_argument("--config", required=True)
  parser.add_argument("--a", nargs="*", default=[], metavar="KEY=VALUE")
  parser.add_argument("--b", nargs="*", default=[], metavar="KEY=VALUE")
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--out", default=None, help="directory for the two workdirs and envdiff.json")
  parser.add_argument("extra", nargs="*", help="config overrides for both sides, after --")
  args = parser.parse_args(argv)
  if not os.path.isfile(os.path.join(REPO, args.config)) and not os.path.isfile(args.config):
    cli.fail(f"--config={args.config}: no such config file")
  if args.steps < 1:
    cli.fail(f"--steps={args.steps}: must be >= 1")
  out = args.out or tempfile.mkdtemp(prefix="envdiff-")
  runs = [run_side(args.config, side, args.steps, os.path.join(out, name), args.extra)
          for name, side in (("a", args.a), ("b", args.b))]
  report = {"config": args.config, "a": args.a, "b": args.b, **compare(*runs)}
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "envdiff.json"), "w") as f:
    json.dump(report, f, indent=2)
  print(table(report, args.a, args.b))
  print(f"report: {os.path.join(out, 'envdiff.json')}")
  return report


if __name__ == "__main__":
  main()
