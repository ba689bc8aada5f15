"""Figures from workdirs (matplotlib, headless): training curves, BPB vs batch size, BPB vs FLOPs with Marin's runs.

python -m tinyjax.plot WORKDIR [WORKDIR ...] --out FILE.png [--kind curves|batch|scaling|dynamics|lr|flops]
                       [--x steps|tokens|flops|chinchilla] [--quantity GLOB]
                       [--group-by CONFIG.KEY] [--leaderboard FILE_OR_DIR_OR_URL ...] [--flops-axis model|hardware]

  curves  train loss and eval BPB against steps, tokens or model FLOPs (3 x forward FLOPs/token x tokens).
  batch   final BPB against train_batch_size, one line per value of --group-by (a dotted config.json key such as
          optimizer.name or model.hidden_dim, or a results key such as model_size; several comma-separated keys
          make one line per combination): the batch-size figure.
  scaling final BPB against the Chinchilla multiple (--x chinchilla, the default here) or tokens (--x tokens), one
          line per --group-by value (model_size by default): the data-scaling figure.
  batch and scaling fall back to the final train loss when some run has no eval (no BPB).
  dynamics the training-dynamics quantities (dynamics.jsonl) whose keys match --quantity (a glob, default
          attention/*/head_*/logit_max: attention-logit growth) against step, one line per key and run.
  lr      final loss against learning rate, one curve per setting, from a `python -m tinyjax.stability` root
          (WORKDIR = its --workdir-root): the LR-sensitivity figure.
  flops   final BPB against model (or hardware) FLOPs, coloured by model size, Marin's runs (--leaderboard) as
          reference points, and the Pareto front: points with a lower BPB than every point with smaller FLOPs
          (the speedrun website's definition). Our runs without a Paloma c4_en eval are drawn hollow and left out
          of the front, since their BPB is on another eval set.
"""
from __future__ import annotations

import fnmatch
import itertools
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")  # headless: no display needed
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from tinyjax import cli, compare  # noqa: E402
from tinyjax.runtime import metrics, results, workdir as workdir_files


def pareto_front(xs: list[float], ys: list[float]) -> list[int]:
  """Indices (by increasing x) of points whose y is below every y at a strictly smaller x."""
  order = sorted(range(len(xs)), key=lambda i: (xs[i], ys[i]))
  front, best, k = [], float("inf"), 0
  while k < len(order):
    same = [i for i in order[k:] if xs[i] == xs[order[k]]]  # points tied on x compete only with smaller x
    front += [i for i in same if ys[i] < best]
    best = min([best] + [ys[i] for i in same])
    k += len(same)
  return front


class Run:
  """One workdir's files: config.json, results (written if missing), metrics rows."""

  def __init__(self, workdir: str):
    self.workdir, self.name = workdir, os.path.basename(os.path.normpath(workdir))
    self.row = compare.load_ours(workdir)  # writes speedrun_results.json if missing
    with open(os.path.join(workdir, results.RESULTS_FILE)) as f:
      self.info = json.load(f)["runs"][0]["run_info"]
    with open(os.path.join(workdir, workdir_files.CONFIG)) as f:
      self.config = json.load(f)
    self.rows = metrics.read(workdir)

  def lookup(self, key: str):
    """A dotted config.json key (optimizer.name), else a speedrun_results key (model_size, tinyjax.optimizer)."""
    for node in (self.config, self.info):
      for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
      if node is not None:
        return node
    raise KeyError(f"{self.workdir}: no config or results key {key!r}")

  def x_values(self, rows: list[dict], axis: str) -> list[float]:
    tokens = [r["step"] * self.config["train"]["train_batch_size"] * self.config["model"]["seq_len"] for r in rows]
    if axis == "tokens":
      return tokens
    if axis == "flops":
      return [3 * self.info["model_flops_per_token"] * t for t in tokens]
    return [r["step"] for r in rows]


def plot_curves(runs: list[Run], axis: str, fig, ax_loss, ax_bpb) -> None:
  """Train loss and eval BPB against `axis`, one colour per run; one legend below both panels (inside either it
  would cover the curves' ends, where every run of an equal-token sweep finishes at the same x)."""
  sets = sorted({name for run in runs for name in run.info["tinyjax"]["eval_sets"]})
  styles = dict(zip(sets, itertools.cycle(("o-", "s--", "^:", "d-."))))  # one marker/line style per eval set
  handles = []
  for run in runs:
    train = [r for r in run.rows if "loss" in r]
    line, = ax_loss.plot(run.x_values(train, axis), [r["loss"] for r in train], label=run.name)
    handles.append(line)
    for name in run.info["tinyjax"]["eval_sets"]:
      evals = [r for r in run.rows if f"eval/{name}/bpb" in r]
      ax_bpb.plot(run.x_values(evals, axis), [r[f"eval/{name}/bpb"] for r in evals], styles[name],
                  color=line.get_color(), label=f"{run.name} ({name})")
  if len(sets) > 1:
    handles += [Line2D([], [], color="gray", linestyle=styles[n][1:], marker=styles[n][0], label=n) for n in sets]
  label = {"steps": "step", "tokens": "tokens", "flops": "model FLOPs (3 x fwd FLOPs/token x tokens)"}[axis]
  for ax, ylabel in ((ax_loss, "train loss (nats/token)"), (ax_bpb, f"eval BPB ({', '.join(sets) or 'none'})")):
    ax.set_xlabel(label)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if axis == "flops":
      ax.set_xscale("log")
  fig.legend(handles=handles, loc="outside lower center", ncol=_legend_columns(len(handles)), fontsize=7)


def _legend_columns(entries: int) -> int:
  return 1 if entries <= 3 else 2 if entries <= 10 else 3


def _group_label(run: Run, group_by: str) -> str:
  keys = group_by.split(",")
  if len(keys) == 1:
    return f"{group_by}={run.lookup(group_by)}"
  return ", ".join(f"{k.split('.')[-1]}={run.lookup(k)}" for k in keys)


def _metric(runs: list[Run]):
  """(run -> y, y label): final BPB when every run has one, else the final train loss."""
  if all(r.row["bpb"] is not None for r in runs):
    return (lambda r: r.row["bpb"]), _bpb_label(runs)
  return (lambda r: r.info["tinyjax"]["final_train_loss"]), "final train loss (nats/token)"


def _lines(runs: list[Run], x_of, group_by: str, ax) -> None:
  y_of, ylabel = _metric(runs)
  groups: dict[str, list[tuple[float, float]]] = {}
  order = {}  # label -> sort key: numbers by value (model_size 762432 before 2000000), then strings
  for run in runs:
    if y_of(run) is not None:
      label = _group_label(run, group_by)
      groups.setdefault(label, []).append((x_of(run), y_of(run)))
      order[label] = [(0, v, "") if isinstance(v, (int, float)) else (1, 0, str(v))
                      for v in (run.lookup(k) for k in group_by.split(","))]
  for label in sorted(groups, key=order.get):
    points = sorted(groups[label])
    ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label=label)
  ax.set_ylabel(ylabel)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)


def plot_batch(runs: list[Run], group_by: str, ax) -> None:
  _lines(runs, lambda r: r.config["train"]["train_batch_size"], group_by, ax)
  sizes = sorted({r.config["train"]["train_batch_size"] for r in runs})
  ax.set_xscale("log", base=2)
  ax.set_xticks(sizes, [str(s) for s in sizes])
  ax.set_xlabel("train_batch_size (sequences)")


def plot_scaling(runs: list[Run], group_by: str, axis: str, ax) -> None:
  if axis == "tokens":
    _lines(runs, lambda r: r.info["total_tokens"], group_by, ax)
    ax.set_xscale("log")
    ax.set_xlabel("training tokens")
    return
  _lines(runs, lambda r: r.config["train"]["chinchilla_multiple"], group_by, ax)
  multiples = sorted({r.config["train"]["chinchilla_multiple"] for r in runs})
  ax.set_xscale("log", base=2)
  ax.set_xticks(multiples, [f"{m:g}x" for m in multiples])
  ax.set_xlabel("Chinchilla multiple (tokens / (20 x params))")


def _bpb_label(runs: list[Run]) -> str:
  sets = sorted({r.row["eval_set"] for r in runs if r.row["eval_set"]})
  return f"final BPB ({', '.join(sets)})"


def plot_flops(runs: list[Run], board: list[dict], flops_axis: str, ax) -> None:
  key = "model_flops" if flops_axis == "model" else "training_hardware_flops"
  marin = [r for r in board if r[key] is not None]
  ours = [r for r in runs if r.row[key] is not None and r.row["bpb"] is not None]
  sizes = [r["model_size"] for r in marin] + [r.row["model_size"] for r in ours]
  if not sizes:
    raise ValueError(f"nothing to plot: no run has {key} and a BPB")
  norm = LogNorm(min(sizes), max(sizes) * 1.0001)
  cmap = plt.get_cmap("viridis")
  ax.scatter([r[key] for r in marin], [r["bpb"] for r in marin], c=[r["model_size"] for r in marin], cmap=cmap,
             norm=norm, s=18, alpha=0.7, label="Marin leaderboard")
  for comparable in (True, False):
    sel = [r for r in ours if r.row["comparable"] == comparable]
    if sel:
      colors = [cmap(norm(r.row["model_size"])) for r in sel]
      ax.scatter([r.row[key] for r in sel], [r.row["bpb"] for r in sel], marker="*", s=160,
                 facecolors=colors if comparable else "none", edgecolors=colors if not comparable else "black",
                 label="tinyjax (Paloma c4_en)" if comparable else "tinyjax (other eval set: not comparable)")
  for size in sorted({r.row["model_size"] for r in ours}):  # our runs of one size joined: a per-size curve
    pts = sorted((r.row[key], r.row["bpb"]) for r in ours if r.row["model_size"] == size)
    ax.plot([p[0] for p in pts], [p[1] for p in pts], "-", color=cmap(norm(size)), lw=1)
  for r in ours:
    suffix = "" if r.row["comparable"] else f" ({r.row['eval_set']})"
    ax.annotate(r.name + suffix, (r.row[key], r.row["bpb"]), fontsize=7, xytext=(4, 4), textcoords="offset points")
  points = [(r[key], r["bpb"]) for r in marin] + [(r.row[key], r.row["bpb"]) for r in ours if r.row["comparable"]]
  front = sorted(points[i] for i in pareto_front([p[0] for p in points], [p[1] for p in points]))
  if front:
    ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="crimson", lw=1.2,
            label="Pareto front (c4_en)")
  plt.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, label="model_size (parameters)")
  ax.set_xscale("log")
  ax.set_xlabel(f"{'model' if flops_axis == 'model' else 'training hardware'} FLOPs")
  ax.set_ylabel("final BPB (Paloma c4_en unless marked)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)


def plot_dynamics(workdirs: list[str], quantity: str, ax) -> None:
  """Every dynamics.jsonl key matching the glob `quantity`, against step: one line per key (and run)."""
  from tinyjax import dynamics  # noqa: PLC0415
  drawn = 0
  for w in workdirs:
    rows = dynamics.read(w)
    if not rows:
      raise ValueError(f"{w}: no dynamics.jsonl rows (run with --config.train.dynamics_every=N)")
    for key in sorted({k for r in rows for k in r if fnmatch.fnmatch(k, quantity)}):
      pts = [(r["step"], r[key]) for r in rows if key in r]
      label = key if len(workdirs) == 1 else f"{os.path.basename(os.path.normpath(w))}: {key}"
      ax.plot(*zip(*pts), marker=".", label=label)
      drawn += 1
  if not drawn:
    raise ValueError(f"--quantity {quantity!r} matches no dynamics key (e.g. attention/*/head_*/logit_max, "
                     "update_ratio/group/*, logits/logz_max)")
  ax.set_xlabel("step")
  ax.set_ylabel(quantity)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=6, ncol=2 if drawn > 8 else 1)


def plot(workdirs: list[str], out: str, kind: str = "curves", axis: str = "steps", group_by: str = "optimizer.name",
         leaderboard: list[str] | None = None, flops_axis: str = "model",
         quantity: str = "attention/*/head_*/logit_max") -> str:
  """Draws `kind` for the workdirs into `out` (PNG); returns out."""
  if kind == "lr":  # the LR-sensitivity figure of a python -m tinyjax.stability root
    from tinyjax import stability  # noqa: PLC0415
    if len(workdirs) != 1:
      raise ValueError("--kind lr takes one stability root (the --workdir-root of python -m tinyjax.stability)")
    summary_path = os.path.join(workdirs[0], stability.SUMMARY + ".json")
    if not os.path.exists(summary_path):
      raise ValueError(f"{summary_path}: not found (run python -m tinyjax.stability first)")
    with open(summary_path) as f:
      stability.plot_lr(json.load(f), out)
    return out
  if kind == "dynamics":
    fig, ax = plt.subplots(figsize=(8, 5))
    plot_dynamics(workdirs, quantity, ax)
    fig.tight_layout()
  else:
    fig = figure([Run(w) for w in workdirs], kind, axis, group_by, leaderboard, flops_axis)
  fig.savefig(out, dpi=120)
  plt.close(fig)
  return out


def figure(runs: list[Run], kind: str, axis: str = "steps", group_by: str = "optimizer.name",
           leaderboard: list[str] | None = None, flops_axis: str = "model"):
  """The curves / batch / scaling / flops figure of runs (a matplotlib Figure, not yet saved)."""
  if kind == "curves":
    sets = {n for r in runs for n in r.info["tinyjax"]["eval_sets"]}
    entries = len(runs) + (len(sets) if len(sets) > 1 else 0)  # the legend below grows the figure, not the panels
    rows = -(-entries // _legend_columns(entries))
    fig, (ax_loss, ax_bpb) = plt.subplots(1, 2, figsize=(11, 4.2 + 0.18 * rows), layout="constrained")
    plot_curves(runs, axis, fig, ax_loss, ax_bpb)
    return fig
  fig, ax = plt.subplots(figsize=(7.5, 5))
  if kind == "batch":
    plot_batch(runs, group_by, ax)
  elif kind == "scaling":
    plot_scaling(runs, group_by, axis, ax)
  else:
    plot_flops(runs, compare.load_leaderboard(leaderboard) if leaderboard else [], flops_axis, ax)
  fig.tight_layout()
  return fig


def main(argv: list[str]) -> None:
  p = cli.ArgParser(prog="python -m tinyjax.plot", description=__doc__.splitlines()[0])
  p.add_argument("workdirs", nargs="+", metavar="WORKDIR")
  p.add_argument("--out", required=True, metavar="FILE.png")
  p.add_argument("--kind", choices=("curves", "batch", "scaling", "dynamics", "lr", "flops"), default="curves")
  p.add_argument("--quantity", default="attention/*/head_*/logit_max",
                 help="dynamics: glob over dynamics.jsonl keys (one line per match)")
  p.add_argument("--x", choices=("steps", "tokens", "flops", "chinchilla"), default=None,
                 help="curves: steps|tokens|flops (default steps); scaling: chinchilla|tokens (default chinchilla)")
  p.add_argument("--group-by", default=None,
                 help="batch/scaling: dotted config/results key(s), comma-separated (lines); default optimizer.name "
                      "for batch, model_size for scaling")
  p.add_argument("--leaderboard", action="append", metavar="FILE_OR_DIR_OR_URL",
                 help="flops: Marin reference runs (repeatable; none by default)")
  p.add_argument("--flops-axis", choices=("model", "hardware"), default="model", help="flops: x axis")
  args = p.parse_args(argv)
  axis = args.x or ("chinchilla" if args.kind == "scaling" else "steps")
  group_by = args.group_by or ("model_size" if args.kind == "scaling" else "optimizer.name")
  try:
    print(plot(args.workdirs, args.out, args.kind, axis, group_by, args.leaderboard, args.flops_axis, args.quantity))
  except (compare.LeaderboardError, OSError, ValueError, KeyError) as e:
    cli.fail(str(e.args[0]) if isinstance(e, KeyError) else str(e))


if __name__ == "__main__":
  main(sys.argv[1:])
