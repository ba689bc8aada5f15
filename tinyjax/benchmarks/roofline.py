"""The roofline held against measured figures: this CPU's step time, and Marin's measured leaderboard runs.

python -m tinyjax.benchmarks.roofline [--cpu tiny,c4_50m:2] [--marin] [--steps 5] [--out roofline_check.json]

  --cpu     each CONFIG[:BATCH] compiled here, its roofline against this CPU's measured peaks
            (targets.measure_cpu), and its step timed as benchmarks.device times it: measured / bound. A ratio
            under 1 means the model overstates the cost: on a CPU, caches serve much of what it counts as memory
            traffic.
  --marin   each run of marin_measured.json (Marin's leaderboard, hardware tinyjax names), tinyjax's equivalent
            config compiled by the target's own compiler (aot.py): its bound beside Marin's measured step
            time (training_time_s / num_train_steps, first-step compile included). A bound above the measured time
            of a comparable program means the model is wrong.

Prints two markdown tables (BUILD_NOTES.md's) and writes every figure to --out.
"""
from __future__ import annotations

import argparse
import json
import os

import jax

from tinyjax import aot, cli, config, env, sharding, step
from tinyjax.benchmarks import device
from tinyjax.hardware import targets

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MARIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "marin_measured.json")


def load(name: str, overrides: list[str] = ()):
  return cli.load_config([f"--config={REPO}/configs/{name}.py", *overrides])


def cpu_row(spec: str, steps: int) -> dict:
  """One CONFIG[:BATCH] on this CPU: the roofline of its compiled step and its measured step time (benchmarks.device's
  synthetic tokens and timing: `steps` steps back to back after a warm-up)."""
  name, _, batch = spec.partition(":")
  cfg = load(name, [f"--config.train.train_batch_size={batch}"] if batch else [])
  cfg.train.grad_accum_steps, cfg.train.plan_num_devices = 1, 0
  mesh = sharding.make_mesh(type("Mesh", (), {"data": 1})())
  built = step.build(cfg, mesh)
  compiled, _ = step.compile_for_device(built, cfg)
  b = cfg.train.train_batch_size
  line = targets.local_roofline(compiled.as_text(), built.model.cfg, b, 1, mesh.devices.flat[0])
  tokens = device.synthetic_tokens(cfg, built.batch_sh)
  measured = device.time_steps(compiled, built.init(), tokens, warmup=2, steps=steps)["step_time_s"]
  return {"config": spec, "batch": b, "bound_s": line["bound_s"], "measured_s": measured,
          "measured_over_bound": measured / line["bound_s"], "hbm_gb": line["hbm_bytes"] / 1e9,
          "gflops": line["flops"] / 1e9, "by_part": {p: v["share"] for p, v in line["by_part"].items()}}


def marin_row(run: dict) -> dict:
  """One Marin run: tinyjax's equivalent step on the target by its own compiler, its bound beside Marin's time."""
  ours = run["tinyjax"]
  cfg = load(ours["config"], ours["overrides"])
  target = targets.parse(ours["target"])
  plan = aot.plan(cfg, target, search=False)
  line = plan["roofline"]
  measured = run["training_time_s"] / run["num_train_steps"]
  return {"run": run["run_name"], "hardware": run["hardware"], "tinyjax": f"{ours['config']} on {target.name}"
          + (f" ({', '.join(o.split('--config.')[1] for o in ours['overrides'])})" if ours["overrides"] else ""),
          "marin_step_s": measured, "bound_s": line["bound_s"], "bound_over_marin": line["bound_s"] / measured,
          "mfu_ceiling": line["mfu_ceiling"], "marin_tokens_per_s": run["train_batch_size"] * run["seq_len"] / measured,
          "tokens_per_s_bound": line["tokens_per_s_bound"], "hbm_gb": line["hbm_bytes"] / 1e9,
          "by_part": {p: v["share"] for p, v in line["by_part"].items()}}


def tables(cpu: list[dict], marin: list[dict]) -> str:
  out = []
  if cpu:
    out += ["| config[:batch] | bound ms | measured ms | measured / bound | HBM GB | GFLOP | loss share |",
            "|---|---|---|---|---|---|---|"]
    out += [f"| {r['config']} | {r['bound_s'] * 1e3:.0f} | {r['measured_s'] * 1e3:.0f} | "
            f"{r['measured_over_bound']:.2f} | {r['hbm_gb']:.2f} | {r['gflops']:.1f} | {r['by_part']['loss']:.2f} |"
            for r in cpu]
  if marin:
    out += ["", "| Marin run | hardware | tinyjax step | Marin ms/step | bound ms | bound / Marin | MFU ceiling | "
            "Marin tokens/s | tokens/s at bound |", "|---|---|---|---|---|---|---|---|---|"]
    out += [f"| {r['run']} | {r['hardware']} | {r['tinyjax']} | {r['marin_step_s'] * 1e3:.1f} | "
            f"{r['bound_s'] * 1e3:.1f} | {r['bound_over_marin']:.2f} | {r['mfu_ceiling']:.3f} | "
            f"{r['marin_tokens_per_s'] / 1e3:,.0f}k | {r['tokens_per_s_bound'] / 1e3:,.0f}k |" for r in marin]
  return "\n".join(out)


def main() -> None:
  parser = cli.ArgParser(description=cli.summary(__doc__))
  parser.add_argument("--cpu", default="tiny,c4_50m:2", help="CONFIG[:BATCH],... timed on this CPU ('' = none)")
  parser.add_argument("--marin", action="store_true", help="also compile Marin's measured runs for their targets")
  parser.add_argument("--steps", type=int, default=5, help="timed steps per CPU config (their mean reported)")
  parser.add_argument("--out", default="roofline_check.json")
  args = parser.parse_args()
  env.apply(config.base().env)
  cpu = [cpu_row(spec, args.steps) for spec in args.cpu.split(",") if spec]
  chip, source = targets.local_chip(jax.devices()[0])  # measured after the timings, for the record
  print(f"this CPU: {chip.peak_flops / 1e9:.0f} GFLOP/s, {chip.hbm_bandwidth / 1e9:.1f} GB/s ({source})", flush=True)
  with open(MARIN) as f:
    runs = json.load(f)["runs"]
  marin = [marin_row(run) for run in runs] if args.marin else []
  with open(args.out, "w") as f:
    json.dump({"cpu_chip": {"peak_flops": chip.peak_flops, "bandwidth": chip.hbm_bandwidth, "source": source},
               "cpu": cpu, "marin": marin, "jax": jax.__version__}, f, indent=1)
  print(tables(cpu, marin))


if __name__ == "__main__":
  main()
