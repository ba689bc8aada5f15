"""Does an environment setting change training? Run the same config twice, in fresh processes, and compare.

python -m tinyjax.envdiff --config=configs/tiny.py --a env.xla_python_client_preallocate=true \
    --b env.xla_python_client_preallocate=false [--steps 20] [--out DIR] [-- extra --config.k=v ...]
python -m tinyjax.envdiff --config=configs/tiny.py --target=h100 --a XLA_FLAGS=--xla_gpu_enable_triton_gemm=false
python -m tinyjax.envdiff --runs WORKDIR_A WORKDIR_B     (two finished runs, e.g. from two machines)

With --target=NAME (tinyjax/hardware/targets.py) nothing is trained: each side compiles the train step for that GPU or TPU
with the target's own compiler (tinyjax/aot.py), and the report says whether the optimized programs differ (their
fingerprints, and which fusions, kernels and op counts changed) and what each side's memory plan is. Settings that
only steer the runtime's allocator (preallocation, memory fraction, allocator kind) cannot change the program; they
are named as such, and the compile shows it.

A KEY=VALUE whose KEY is UPPER_CASE is an environment variable of that side's process (e.g. XLA_FLAGS=...);
otherwise it is a config override (--config.KEY=VALUE). Both sides log every step (loss and parameter norm) and
end with a SHA-256 of the final parameters. The report gives the first step whose loss differs, the largest
absolute and relative differences of loss and parameter norm, and whether the runs are bitwise identical; it is
printed as a table and written to OUT/envdiff.json. Every report names what differs in the two runs' recorded
settings and hosts (run_info.json env: variables, jax options, the host CPU: model, the ISA XLA targets, caches,
usable CPUs), so that a difference between two machines' runs comes with its likely cause.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import numpy as np

from tinyjax import cli, env
from tinyjax.launch import commands as C
from tinyjax.runtime import metrics, workdir as workdirs

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
  cmd = C.main_argv([f"--config={config}", f"--workdir={workdir}", f"--config.train.num_train_steps={steps}",
                     "--config.train.log_every=1", f"--config.train.steps_per_eval={steps}",
                     "--config.checkpoint.enabled=False", *extra, *overrides], sys.executable)
  proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, **env_vars}, capture_output=True, text=True)
  if proc.returncode != 0:
    cli.fail(f"the run with {' '.join(settings) or 'no settings'} failed (exit {proc.returncode}): "
          f"{(proc.stderr.strip().splitlines() or ['?'])[-1]}")
  return read_run(workdir)


def read_run(workdir: str) -> dict:
  """A finished run's per-step rows, final param_sha256 and recorded env (run_info.json)."""
  try:
    rows = metrics.read(workdir)
    with open(os.path.join(workdir, workdirs.RUN_INFO)) as f:
      recorded = json.load(f).get("env") or {}
  except (OSError, ValueError) as e:
    cli.fail(f"{workdir}: not a finished tinyjax run ({getattr(e, 'strerror', None) or e})")
  if not any("loss" in r for r in rows):
    cli.fail(f"{workdir}: no logged steps in metrics.jsonl")
  return {"loss": {r["step"]: r["loss"] for r in rows if "loss" in r},
          "param_norm": {r["step"]: r["param_norm"] for r in rows if "param_norm" in r},
          "param_sha256": next((r["param_sha256"] for r in rows if "param_sha256" in r), None),
          "env": {k: recorded.get(k) or {} for k in ("environment", "jax_config", "host_cpu")}}


def env_differences(a: dict, b: dict) -> list[str]:
  """'host_cpu.model: AMD EPYC | Intel(R) Xeon(R) ...' for each recorded setting or host fact that differs."""
  out = []
  for part in ("environment", "jax_config", "host_cpu"):
    x, y = a.get(part) or {}, b.get(part) or {}
    out += [f"{part}.{k}: {x.get(k, '(unset)')} | {y.get(k, '(unset)')}" for k in sorted(set(x) | set(y))
            if x.get(k, "(unset)") != y.get(k, "(unset)")]
  return out


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
  report["env_differences"] = env_differences(a.get("env") or {}, b.get("env") or {})
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
  lines.append("recorded settings and host: " + ("identical" if not report["env_differences"] else "differ (A | B):"))
  lines += ["  " + d for d in report["env_differences"]]
  return "\n".join(lines)


def target_side(config: str, settings: list[str], target: str, extra: list[str]) -> dict:
  """One fresh `--dry_run --target` process under this side's settings; returns its plan for the target."""
  env_vars, overrides = _side(settings)
  cmd = C.main_argv([f"--config={config}", "--dry_run", f"--target={target}", *extra, *overrides], sys.executable)
  proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, **env_vars}, capture_output=True, text=True)
  if proc.returncode != 0:
    cli.fail(f"compiling for {target} with {' '.join(settings) or 'no settings'} failed (exit {proc.returncode}): "
             f"{(proc.stderr.strip().splitlines() or ['?'])[-1]}")
  return json.loads(proc.stdout)["memory"]["targets"][target]


def allocator_only(settings: list[str]) -> bool:
  """Whether every setting only steers the runtime's allocator (env.ALLOCATOR_ONLY): it cannot enter the program."""
  return all(item.split("=", 1)[0].removeprefix("env.") in env.ALLOCATOR_ONLY for item in settings)


def compare_programs(a: dict, b: dict) -> dict:
  """What differs between two compiles of one step: fingerprint, per-kind counts, memory."""
  changed = {}
  for part in ("ops", "fusions", "kernels"):
    pa, pb = a["program"][part], b["program"][part]
    diff = {k: [pa.get(k, 0), pb.get(k, 0)] for k in sorted(set(pa) | set(pb)) if pa.get(k, 0) != pb.get(k, 0)}
    if diff:
      changed[part] = diff
  memory = {k: [a[k], b[k]] for k in ("temp_gib", "peak_gib", "usable_gib", "fits")}
  return {"program_identical": a["hlo_fingerprint"] == b["hlo_fingerprint"],
          "fingerprints": [a["hlo_fingerprint"], b["hlo_fingerprint"]], "changed": changed, "memory": memory}


def target_table(report: dict) -> str:
  lines = [f"A: {' '.join(report['a']) or '(as is)'}", f"B: {' '.join(report['b']) or '(as is)'}",
           f"target {report['target']} ({report['compiler']})"]
  if report["allocator_only"]:
    lines.append("the settings that differ are allocator-only: they decide how device memory is reserved, not what is "
                 "compiled")
  fa, fb = report["fingerprints"]
  lines.append(f"optimized program identical: {report['program_identical']} (fingerprints {fa} / {fb})")
  for part, diff in report["changed"].items():
    lines.append(f"  {part}: " + ", ".join(f"{k} {x} -> {y}" for k, (x, y) in diff.items()))
  lines += [f"  {k:<11} A {x!s:>8}  B {y!s:>8}" for k, (x, y) in report["memory"].items()]
  return "\n".join(lines)


def main(argv=None) -> dict:
  parser = cli.ArgParser(prog="python -m tinyjax.envdiff", description=__doc__.splitlines()[0])
  parser.add_argument("--config", help="the config both sides train (or compile, with --target)")
  parser.add_argument("--runs", nargs=2, metavar="WORKDIR", help="compare two finished runs instead of training")
  parser.add_argument("--a", nargs="*", default=[], metavar="KEY=VALUE")
  parser.add_argument("--b", nargs="*", default=[], metavar="KEY=VALUE")
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--out", default=None, help="directory for the two workdirs and envdiff.json")
  parser.add_argument("--target", default="", help="compile for this GPU/TPU (h100, v5p-8, ...) instead of training")
  parser.add_argument("extra", nargs="*", help="config overrides for both sides, after --")
  args = parser.parse_args(argv)
  if args.runs:
    report = compare(*map(read_run, args.runs))
    print(table(report, [args.runs[0]], [args.runs[1]]))
    return report
  if not args.config:
    cli.fail("--config=FILE is required (or --runs WORKDIR_A WORKDIR_B)")
  if not os.path.isfile(os.path.join(REPO, args.config)) and not os.path.isfile(args.config):
    cli.fail(f"--config={args.config}: no such config file")
  if args.steps < 1:
    cli.fail(f"--steps={args.steps}: must be >= 1")
  if args.target:
    from tinyjax import config  # noqa: PLC0415
    from tinyjax.hardware import targets
    try:
      targets.parse(args.target)
    except config.ConfigError as e:
      cli.fail(str(e))
  out = args.out or tempfile.mkdtemp(prefix="envdiff-")
  if args.target:
    plans = [target_side(args.config, side, args.target, args.extra) for side in (args.a, args.b)]
    differing = sorted(set(args.a) ^ set(args.b))
    report = {"config": args.config, "a": args.a, "b": args.b, "target": args.target,
              "compiler": plans[0]["compiler"], "allocator_only": bool(differing) and allocator_only(differing),
              **compare_programs(*plans)}
  else:
    runs = [run_side(args.config, side, args.steps, os.path.join(out, name), args.extra)
            for name, side in (("a", args.a), ("b", args.b))]
    report = {"config": args.config, "a": args.a, "b": args.b, **compare(*runs)}
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "envdiff.json"), "w") as f:
    json.dump(report, f, indent=2)
  print(target_table(report) if args.target else table(report, args.a, args.b))
  print(f"report: {os.path.join(out, 'envdiff.json')}")
  return report


if __name__ == "__main__":
  main()
