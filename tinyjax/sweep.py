"""Sweeps: a grid of runs from one base config, each in its own workdir, run locally or on TPU VMs / SLURM, reported.

python -m tinyjax.sweep SWEEP_FILE [--launch local|tpu|slurm|print] [--root DIR] [--dry-run] [--report]
                        [-- MAIN ARGS]  (local, print)   [-- LAUNCHER ARGS [-- MAIN ARGS]]  (tpu, slurm)
A sweep file (configs/sweeps/NAME.py) defines get_sweep() -> dict:
  config   base config file, relative to the repository root (e.g. "configs/c4_50m.py")
  fixed    {dotted key: value} overrides shared by every point
  axes     list of axes; an axis is a list of override dicts (one per value; a dict may set several keys at once)
  figures  list of {"kind": "batch"|"scaling", "group_by": "key[,key]", "x": "chinchilla"|"tokens"} for --report
The grid is the product of the axes. A point's workdir is ROOT/NAME, NAME = its axis overrides as key-value pairs
("train_batch_size-16_lr_scaling_base_batch-128_warmup-0.05"): deterministic and filesystem-safe.
A point with speedrun_results.json and run_info.json status "completed" is skipped; any other is (re)run in its
workdir, where tinyjax.main resumes from the latest checkpoint.
--launch local: one `python -m tinyjax.main` subprocess after another; tpu: `tinyjax.launch.tpu babysit` per point
(LAUNCHER ARGS: --name, --zone, --repo, ...); slurm: one `tinyjax.launch.slurm` job per point; print: the commands.
MAIN ARGS: --config.KEY=VALUE overrides added to every point (e.g. --config.data.cache_dir=/data/cache); a key the
sweep itself sets (fixed or an axis) is refused, as the points would silently stop differing.
--report: ROOT/report.csv (+ console table) and the sweep's figures ROOT/<kind>.png from the workdirs.
"""
from __future__ import annotations

import csv
import dataclasses
import importlib.util
import itertools
import os
import posixpath
import shlex
import subprocess
import sys

from tinyjax import cli, errors
from tinyjax.hardware import targets  # no jax: the preflight compiles run in child processes
from tinyjax.launch import commands as C
from tinyjax.runtime import workdir as workdirs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHES = ("local", "tpu", "slurm", "print")
# Stop the sweep (later points would meet the same): 75 preempted (checkpointed), 69 no READY TPU VM in time.
STOP_CODES = (errors.EXIT_PREEMPTED, errors.EXIT_NOT_READY)
REPORT_COLUMNS = ("status", "completed_steps", "planned_steps", "total_tokens", "final_train_loss", "eval_set",
                  "bpb", "training_time")


@dataclasses.dataclass(frozen=True)
class Point:
  name: str
  overrides: dict  # every override of this point, fixed ones included, in a stable order
  axis_values: dict  # just the ones that vary (the name and the report columns)


def _fmt(value) -> str:
  return str(value)  # ml_collections parses "16", "0.05", "True", "muon" back to the key's type


def load(path: str) -> dict:
  """The sweep file's get_sweep() dict, checked."""
  if not os.path.isfile(path):
    cli.fail(f"{path}: no such sweep file (see configs/sweeps/)")
  spec = importlib.util.spec_from_file_location("_tinyjax_sweep", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  sweep = module.get_sweep() if hasattr(module, "get_sweep") else None
  if not isinstance(sweep, dict) or not isinstance(sweep.get("config"), str) or not isinstance(
      sweep.get("axes"), list) or not all(isinstance(a, list) and a for a in sweep["axes"]):
    cli.fail(f"{path}: get_sweep() must return {{'config': PATH, 'axes': [[{{key: value}}, ...], ...], ...}}")
  return {"fixed": {}, "figures": [], **sweep}


def expand(sweep: dict) -> list[Point]:
  """The grid, in axis order (the last axis varies fastest); names are unique or the sweep is rejected."""
  points = []
  for combo in itertools.product(*sweep["axes"]):
    varying = {k: v for d in combo for k, v in d.items()}
    points.append(Point(C.run_name(varying), {**sweep["fixed"], **varying}, varying))
  names = [p.name for p in points]
  if len(set(names)) != len(names):
    cli.fail(f"sweep points share a workdir name ({sorted({n for n in names if names.count(n) > 1})[0]}): "
             "give each axis value distinct overrides")
  return points


def workdir(root: str, point: Point) -> str:
  return posixpath.join(root.rstrip("/"), point.name) if "://" in root else os.path.join(root, point.name)


def config_path(sweep: dict, point: Point) -> str:
  """The point's base config as written in the sweep file (relative to the repository root)."""
  return point.overrides.get("config", sweep["config"])


def main_args(config: str, root: str, point: Point, extra: list[str] = ()) -> list[str]:
  """tinyjax.main's arguments for one point: --config=FILE, a --config.KEY=VALUE per override, the extra
  overrides given after --, --workdir."""
  return [f"--config={config}", *[f"--config.{k}={_fmt(v)}" for k, v in point.overrides.items() if k != "config"],
          *extra, f"--workdir={workdir(root, point)}"]


def split_args(how: str, after: list[str]) -> tuple[list[str], list[str]]:
  """What follows the first `--` -> (launcher args, extra tinyjax.main args): local/print take only main args;
  tpu/slurm take their launcher's args, then optionally `--` and main args."""
  if how not in ("tpu", "slurm"):
    return [], after
  return C.split_at_dashes(after)


def check_extra(sweep: dict, points: list[Point], extra: list[str]) -> None:
  """Extra main args must be --config.KEY=VALUE overrides of keys the sweep does not set itself."""
  swept = {k for p in points for k in p.overrides}
  for arg in extra:
    key = arg[len("--config."):].split("=", 1)[0] if arg.startswith("--config.") and "=" in arg else None
    if key is None:
      cli.fail(f"{arg!r} after --: only --config.KEY=VALUE overrides go to every point's tinyjax.main (the sweep "
               "sets --config and --workdir per point)")
    if key in swept or key == "config":
      cli.fail(f"{arg!r} after --: config.{key} is set by the sweep file (fixed or an axis); change it there")


def status(path: str) -> str:
  """runtime.workdir.status of a point's workdir ("completed" points are skipped, any other is (re)run). A remote
  (gs://) workdir is 'remote': not read remotely (no round trips per point), always launched; tinyjax.main resumes
  or, for a finished run, restores it and stops at once."""
  return "remote" if "://" in path else workdirs.status(path)


def _local_config(config_path: str) -> str:
  """The base config as an absolute local path: as given if it exists from here, else under the repository root."""
  return os.path.abspath(config_path) if os.path.exists(config_path) else os.path.join(REPO, config_path)


def _launch_point(how: str, sweep: dict, root: str, point: Point, launcher_args: list[str], dry_run: bool,
                  stem: str, extra: list[str]) -> int:
  if how == "local":
    argv = C.main_argv(main_args(_local_config(config_path(sweep, point)), root, point, extra), sys.executable)
    print(f"tinyjax.sweep: {'would run' if dry_run else 'running'} {point.name}: {shlex.join(argv)}", flush=True)
    return 0 if dry_run else subprocess.call(argv)
  dry = ["--dry-run", "--skip-preflight"] if dry_run else ["--skip-preflight"]  # the sweep's preflight did it
  args = main_args(config_path(sweep, point), root, point, extra)  # remote: the path inside the checkout
  if how == "tpu":
    from tinyjax.launch import tpu  # noqa: PLC0415
    return tpu.main(["babysit", *launcher_args, *dry, "--", *args])
  from tinyjax.launch import slurm  # noqa: PLC0415
  return slurm.main([*launcher_args, f"--job-name={stem}-{point.name}", *dry, "--", *args])


def launch(how: str, sweep: dict, root: str, points: list[Point], launcher_args: list[str], dry_run: bool,
           stem: str, extra: list[str] = ()) -> int:
  """Runs (or prints) every point that is not finished; returns 0 or the first failing exit code."""
  worst = 0
  for i, point in enumerate(points):
    state = status(workdir(root, point))
    if how == "print":
      tag = "# done: " if state == "completed" else ""
      print(tag + shlex.join(C.main_argv(main_args(config_path(sweep, point), root, point, extra))))
      continue
    if state == "completed":
      print(f"tinyjax.sweep: [{i + 1}/{len(points)}] {point.name}: completed, skipped", flush=True)
      continue
    print(f"tinyjax.sweep: [{i + 1}/{len(points)}] {point.name}: {state}", flush=True)
    rc = _launch_point(how, sweep, root, point, launcher_args, dry_run, stem, list(extra))
    if rc != 0:
      print(f"tinyjax.sweep: {point.name} exited with code {rc}", file=sys.stderr, flush=True)
      worst = worst or rc
      if rc in STOP_CODES:  # rerunning the sweep resumes this point
        return rc
  return worst


def launch_target(how: str, launcher_args: list[str]) -> str | None:
  """The hardware a launch gets, as a tinyjax.hardware.targets name: the TPU launcher's --accelerator-type (default v4-8) or
  SLURM's NODESxGPUSx--gpu-type; None for local runs (the run's own memory check refuses before allocating) and a
  SLURM launch without --gpu-type."""
  import argparse  # noqa: PLC0415
  p = argparse.ArgumentParser(add_help=False)
  p.add_argument("--accelerator-type", default="v4-8")
  p.add_argument("--gpu-type", default="")
  p.add_argument("--nodes", type=int, default=1)
  p.add_argument("--gpus-per-node", type=int, default=8)
  a = p.parse_known_args(launcher_args)[0]
  if how == "tpu":
    return a.accelerator_type
  return f"{a.nodes}x{a.gpus_per_node}x{a.gpu_type}" if how == "slurm" and a.gpu_type else None


def preflight(sweep: dict, root: str, points: list[Point], extra: list[str], names: list[str],
              launch_on: str | None) -> None:
  """Before launching: every point compiled for every target by the target's own compiler (tinyjax/aot.py), a table
  of which fit where, and a one-line refusal (exit 2) when a point cannot fit the hardware it is launched on."""
  from tinyjax import config
  from tinyjax import aot  # noqa: PLC0415
  columns = list(dict.fromkeys([*names, *([launch_on] if launch_on else [])]))
  todo = [p for p in points if launch_on is None or status(workdir(root, p)) != "completed"]
  print(f"tinyjax.sweep: preflight of {len(todo)} points on {', '.join(columns)} (peak / usable GiB per chip)",
        flush=True)
  misfits, rows = [], [["point", *columns]]
  for point in todo:
    args = main_args(_local_config(config_path(sweep, point)), root, point, extra)
    row = [point.name]
    for name in columns:
      try:
        p = aot.plan(cli.load_config(args), targets.parse(name), search=False)
        row.append(f"{'fits' if p['fits'] else 'NO'} {p['peak_gib']:.1f}/{p['usable_gib']:.1f}")
        if name == launch_on and p["fits"] is False:
          misfits.append(point.name)
      except config.ConfigError as e:
        cli.fail(f"preflight of {point.name} on {name}: {e}")
    rows.append(row)
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  for r in rows:
    print("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip(), flush=True)
  if misfits:
    cli.fail(f"{len(misfits)} point(s) cannot fit {launch_on}: {', '.join(misfits)}; set grad_accum_steps=0 (auto) in "
             "the sweep file, use larger hardware, or pass --skip-preflight")


def report_rows(root: str, points: list[Point]) -> list[dict]:
  """One row per point: its axis values and, when it has run, its results (speedrun_results.json, written if
  missing)."""
  from tinyjax import compare  # noqa: PLC0415 - the report alone needs the results machinery
  rows = []
  for point in points:
    path = workdir(root, point)
    row = {"name": point.name, **point.axis_values}
    ran = all(os.path.exists(os.path.join(path, f)) for f in (workdirs.CONFIG, workdirs.RUN_INFO))
    ours = compare.load_ours(path) if ran else None  # writes speedrun_results.json if missing (then: completed)
    row["status"] = status(path)
    if ours:
      info = workdirs.read_json(path, workdirs.RESULTS)["runs"][0]["run_info"]["tinyjax"]
      row.update(completed_steps=info["completed_steps"], planned_steps=info["planned_steps"],
                 total_tokens=ours["total_tokens"], final_train_loss=info["final_train_loss"],
                 eval_set=ours["eval_set"], bpb=ours["bpb"], training_time=ours["training_time"])
    rows.append(row)
  return rows


def _cell(value) -> str:
  if isinstance(value, float):
    return f"{value:.4f}" if abs(value) < 1e4 else f"{value:.4g}"
  return "" if value is None else str(value)


def write_report(sweep: dict, root: str, points: list[Point]) -> tuple[str, list[str]]:
  """ROOT/report.csv, the console table, and the sweep's figures; returns (csv path, figure paths)."""
  if "://" in root:
    cli.fail(f"--report reads local workdirs; copy {root} here first (e.g. gcloud storage rsync -r) and pass --root")
  rows = report_rows(root, points)
  columns = ["name", *points[0].axis_values, *REPORT_COLUMNS]
  out = os.path.join(root, "report.csv")
  os.makedirs(root, exist_ok=True)
  with open(out, "w", newline="") as f:
    w = csv.DictWriter(f, columns, extrasaction="ignore")
    w.writeheader()
    w.writerows({c: _cell(r.get(c)) for c in columns} for r in rows)
  cells = [[c.split(".")[-1] for c in columns]] + [[_cell(r.get(c)) for c in columns] for r in rows]
  widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
  for row in cells:
    print("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())
  done = [workdir(root, p) for p, r in zip(points, rows) if r["status"] == "completed"]  # figures: finished only
  figures = []
  if done:
    from tinyjax import plot  # noqa: PLC0415 - matplotlib only for the report
    for fig in sweep["figures"]:
      path = os.path.join(root, f"{fig['kind']}.png")
      figures.append(plot.plot(done, path, fig["kind"], axis=fig.get("x", "steps"),
                               group_by=fig.get("group_by", "model_size")))
  print(f"tinyjax.sweep: {out}" + "".join(f"\ntinyjax.sweep: {p}" for p in figures))
  return out, figures


def main(argv: list[str]) -> int:
  own, after = C.split_at_dashes(argv)
  p = cli.ArgParser(prog="python -m tinyjax.sweep", description=__doc__.splitlines()[0])
  p.add_argument("sweep_file")
  p.add_argument("--launch", choices=LAUNCHES, default=None, help="run the points (default: local unless --report)")
  p.add_argument("--root", default="", help="parent of the points' workdirs (default workdir/sweeps/<sweep name>)")
  p.add_argument("--dry-run", action="store_true", help="print the commands the launch would run")
  p.add_argument("--report", action="store_true", help="write ROOT/report.csv and the figures")
  p.add_argument("--targets", default="", help="print which points fit on these (h100, v5p-8, ...; see "
                 "tinyjax/hardware/targets.py) by their own compilers; with --launch tpu|slurm the launch hardware is added")
  p.add_argument("--skip-preflight", action="store_true", help="launch on TPU/SLURM without compiling each point "
                 "for the hardware first")
  a = p.parse_args(own)
  sweep = load(a.sweep_file)
  stem = os.path.splitext(os.path.basename(a.sweep_file))[0]
  root = a.root or os.path.join("workdir", "sweeps", stem)
  points = expand(sweep)
  how = a.launch or (None if a.report or a.targets else "local")
  if how is None and after:
    cli.fail(f"{shlex.join(after)}: arguments after -- go to a launch; --report alone launches nothing")
  launcher_args, extra = split_args(how, after)
  check_extra(sweep, points, extra)
  if how in ("tpu", "slurm") and not launcher_args:
    cli.fail(f"--launch {how} needs the launcher's flags after --, e.g. -- "
             + ("--name=tj --zone=us-central2-b --repo=URL" if how == "tpu" else "--partition=gpu --nodes=1"))
  on = None if a.skip_preflight or how in ("print", None) else launch_target(how, launcher_args)
  try:
    names = [t.name for t in targets.parse_list(a.targets)]
  except targets.ConfigError as e:
    cli.fail(str(e))
  if names or on:
    preflight(sweep, root, points, extra, names, on)
  rc = launch(how, sweep, root, points, launcher_args, a.dry_run, stem, extra) if how else 0
  if a.report and not a.dry_run:
    write_report(sweep, root, points)
  return rc


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
