"""Every shipped config's train step on each target, by the target's own compiler and by the CPU proxy.

python -m tinyjax.benchmarks.targets [--configs tiny,c4_50m] [--targets h100,v5p-8] [--out targets.json]

For each config x target: the target's plan (tinyjax/aot.py: libtpu or the CUDA plugin, in a child process) and the
CPU-proxy plan (this machine's compiler, one chip's share of the batch). Prints a markdown table (BUILD_NOTES.md's)
and keeps every plan in --out, which a rerun reuses (a full table is dozens of compiles). The roofline columns
(hardware/roofline.py) are per chip and per step, from the target's own optimized module.
"""
from __future__ import annotations

import argparse
import json
import os

import jax

from tinyjax import aot, cli, config, env, plan, sharding
from tinyjax.hardware import targets

CONFIGS = ("tiny", "stability_tiny", "c4_30m", "c4_50m", "c4_75m", "c4_130m")
TARGETS = ("h100", "h200", "a100-40gb", "v4-8", "v5p-8", "v5e-8")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def row(name: str, target: str, real: dict, proxy: dict) -> str:
  verdict = lambda fits: {True: "yes", False: "**no**", None: "?"}[fits]
  kernels = ", ".join(k for k in real["kernels"] or () if k in ("tpu_custom_call", "__gpu$xla.gpu.triton")) or "-"
  proxy_fits = proxy["peak_gib"] <= real["usable_gib"]  # the proxy's figures against this target's usable memory
  auto = real["grad_accum_steps"] if real["grad_accum_steps"] is not None else "-"
  return (f"| {name} | {target} | {real['per_device_batch']} | {real['temp_gib']:.2f} | {real['peak_gib']:.2f} | "
          f"{real['usable_gib']:.1f} | {verdict(real['fits'])} | {auto} | {kernels} | {real['compile_s']:.0f} | "
          f"{proxy['temp_gib']:.2f} | {proxy['peak_gib']:.2f} | {verdict(proxy_fits)} | {speed(real.get('roofline'))}")


def speed(line: dict | None) -> str:
  """The roofline columns: HBM GB per chip per step, bound ms, MFU ceiling, tokens/s at the bound, loss share."""
  if not line:
    return "- | - | - | - | - |"
  return (f"{line['hbm_bytes'] / 1e9:.1f} | {line['bound_s'] * 1e3:.1f} | {line['mfu_ceiling']:.3f} | "
          f"{line['tokens_per_s_bound'] / 1e3:,.0f}k | {line['by_part']['loss']['share']:.2f} |")


HEADER = ("| config | target | batch/chip | temp GiB | peak GiB | usable GiB | fits | accum=0 picks | kernel | compile s "
          "| CPU-proxy temp | CPU-proxy peak | CPU-proxy fits | HBM GB/step | bound ms | MFU ceiling | tokens/s at bound "
          "| loss share |\n|" + "---|" * 18)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--configs", default=",".join(CONFIGS))
  parser.add_argument("--targets", default=",".join(TARGETS))
  parser.add_argument("--out", default="targets.json")
  args = parser.parse_args()
  env.apply(config.base().env)  # a CPU process: libtpu and the CUDA plugin stay unloaded (the children load them)
  done = json.load(open(args.out)) if os.path.exists(args.out) else {}
  mesh = sharding.make_mesh(type("Mesh", (), {"data": 1})())
  lines = [HEADER]
  for name in args.configs.split(","):
    cfg = cli.load_config([f"--config={REPO}/configs/{name}.py"])
    for target in targets.parse_list(args.targets):
      key = f"{name}/{target.name}"
      if key not in done or "roofline" not in done[key]["real"]:  # plans kept from before the roofline: redone
        proxy = next((d["proxy"] for k, d in done.items() if k.startswith(f"{name}/") and d["chips"] == target.chips),
                     None)  # one CPU compile per share of the batch: the GPUs (and v4-8/v5p-8) share theirs
        done[key] = {"real": aot.plan(cfg, target), "proxy": proxy or plan.proxy_plan(cfg, mesh, target),
                     "chips": target.chips}
        done[key]["real"].pop("program")
        with open(args.out, "w") as f:
          json.dump(done, f, indent=1)
      lines.append(row(name, target.name, done[key]["real"], done[key]["proxy"]))
      print(lines[-1], flush=True)
  print(f"\n{jax.__version__=}; CPU proxy: {jax.default_backend()} compiler, blockwise/reference attention")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
