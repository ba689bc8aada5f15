"""The train step compiled for a target this machine does not have, by the target's own compiler (deviceless AOT).

libtpu compiles for any TPU slice from a topology description, and the CUDA PJRT plugin for a GPU described by a
target config (tinyjax/hardware/targets.py); neither needs the device. Their buffer assignment (`memory_analysis()`) and the
kernels in the compiled module are the hardware's own figures short of running it.

Each target compiles in a child process (`python -m tinyjax.aot REQUEST`), so that the process asking, a dry run or a
launcher, never loads libtpu or the CUDA plugin, and one plugin's state cannot leak into another target's compile.
The child starts only JAX's CPU backend; the plugin serves the topology and the compiler.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import pickle
import subprocess
import sys
import tempfile
import time

from tinyjax import errors
from tinyjax.errors import ConfigError
from tinyjax.hardware import hlo, roofline, targets

# A compile-only child: CPU is the only backend it starts; no GCE metadata queries (libtpu would ask the metadata
# server which TPU this VM is); no /tmp/libtpu_lockfile (it admits one libtpu process per machine, but compiles may
# run side by side); no check of the CUDA libraries a GPU run needs (jax[cuda12-local] has none).
CHILD_ENV = {"JAX_PLATFORMS": "cpu", "TPU_SKIP_MDS_QUERY": "1", "JAX_SKIP_CUDA_CONSTRAINTS_CHECK": "1",
             "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
             "TF_CPP_MIN_LOG_LEVEL": "3"}


def plan(cfg, target: targets.Target, search: bool = True, hlo_dir: str = "") -> dict:
  """The target's memory plan and roofline from its own compiler, computed in a child process (see compile_for);
  with `hlo_dir` the optimized module is also written to HLO_DIR/NAME.hlo.txt."""
  with tempfile.TemporaryDirectory(prefix="tinyjax-aot-") as tmp:
    request = os.path.join(tmp, "request.pkl")
    with open(request, "wb") as f:
      pickle.dump({"cfg": cfg, "target": target, "search": search, "hlo_dir": hlo_dir}, f)
    proc = subprocess.run([sys.executable, "-m", "tinyjax.aot", request], capture_output=True, text=True,
                          env={**os.environ, **CHILD_ENV}, check=False)
  lines = proc.stdout.strip().splitlines()
  result = json.loads(lines[-1]) if proc.returncode == 0 and lines else None
  if result is None:
    tail = "\n".join(proc.stderr.strip().splitlines()[-25:])
    raise errors.CompileFailed(f"compiling the train step for {target.name} failed (exit {proc.returncode}):\n{tail}")
  if "error" in result:
    raise ConfigError(result["error"])
  return result


def plans(cfg, names: list[targets.Target], proxy=None, hlo_dir: str = "") -> dict:
  """{name: plan} for each target: its own compiler's where installed, else `proxy(target)` (labelled)."""
  out = {}
  for target in names:
    if targets.compiler_installed(target.platform):
      out[target.name] = plan(cfg, target, hlo_dir=hlo_dir)
    elif proxy is not None:
      print(f"tinyjax: note: the {target.platform.upper()} compiler is not installed: {target.name} figures are CPU "
            f"proxies ({targets.install_hint(target.platform)} for the real ones)", file=sys.stderr, flush=True)
      out[target.name] = proxy(target)
    else:
      raise ConfigError(f"compiling for {target.name} needs the {target.platform.upper()} compiler: "
                        f"{targets.install_hint(target.platform)}")
  return out


def preflight(main_args: list[str], target_name: str) -> str:
  """Before a launcher spends money: compiles the run `python -m tinyjax.main MAIN_ARGS` would start for the
  target and returns a one-line verdict; a run that cannot fit, or a missing compiler, is a ConfigError."""
  from tinyjax import cli  # noqa: PLC0415
  cfg = cli.load_config(main_args)
  target = targets.parse(target_name)
  skip = "or pass --skip-preflight to launch without this check"
  if not targets.compiler_installed(target.platform):
    raise ConfigError(f"the preflight compile for {target.name} needs the {target.platform.upper()} compiler: "
                      f"{targets.install_hint(target.platform)}, {skip}")
  p = plan(cfg, target, search=False)
  t = cfg.train
  if p["fits"] is False:
    needs = "at least " if "compiler_refused" in p else ""  # libtpu refused it: its temporaries alone
    raise ConfigError(
        f"{target.name} cannot hold this run: the train step needs {needs}{p['peak_gib']} GiB per chip and "
        f"{p['usable_gib']}"
        f" GiB are usable ({p['compiler']}; config.train.train_batch_size={t.train_batch_size} over {p['chips']} "
        f"chips, grad_accum_steps={p['accum']}); set config.train.grad_accum_steps=0 (auto) or a larger value, "
        f"use a larger slice, {skip}")
  return (f"preflight {target.name}: fits ({p['peak_gib']} of {p['usable_gib']} GiB per chip, grad_accum_steps="
          f"{p['accum']}; {p['compiler']})")


def compiler_name(target: targets.Target, device) -> str:
  version = importlib.metadata.version
  if target.platform == "tpu":
    return f"libtpu {version('libtpu')} ({device.device_kind}, topology {target.topology})"
  return f"XLA GPU, jax-cuda12-pjrt {version('jax-cuda12-pjrt')} ({device.device_kind})"


# ---- the child process -----------------------------------------------------------------------------------------

def topology(target: targets.Target):
  from jax.experimental import topologies  # noqa: PLC0415
  if target.platform == "tpu":
    return topologies.get_topology_desc(topology_name=target.topology, platform="tpu",
                                        chip_config_name=target.chip_config, chips_per_host_bounds=target.chips_per_host)
  with open(target.target_config) as f:
    return topologies.get_topology_desc(platform="cuda", target_config=f.read(), topology=target.topology)


def compile_for(cfg, target: targets.Target, search: bool = True, hlo_dir: str = "") -> dict:
  """In the child: the step compiled for `target` at the configured accumulation (0 = auto), the accumulation
  grad_accum_steps=0 would pick (with `search`; beyond a configured one that does not fit, each candidate is one
  more compile), and the figures, kernels and fingerprint of the compiled module."""
  from tinyjax import config, sharding, step  # noqa: PLC0415
  devices = topology(target).devices
  config.validate(cfg, num_devices=len(devices))  # batch and accumulation must divide over the target's chips
  mesh = sharding.make_mesh(cfg.mesh, devices)
  data = mesh.devices.size
  built = step.build(cfg, mesh, target.platform)
  planner = built.planner(cfg.train.train_batch_size)
  start = time.perf_counter()
  figures = step.plan_figures(planner, built.model.cfg.attention, target.memory_bytes, target.platform, search)
  compiled = planner.executables.get(figures["accum"])  # None: the compiler refused it (out of memory)
  text = compiled.as_text() if compiled else ""
  compile_s = round(time.perf_counter() - start, 1)
  if compiled and hlo_dir:
    hlo.write_module(hlo_dir, target.name, text)
  line = roofline.step_report(text, built.model.cfg, cfg.train.train_batch_size, data, target.chip,
                              target.platform) if compiled else None
  if line is not None:
    line["compiler_estimate"] = hlo.compiler_estimate(compiled)
  return {"compiler": compiler_name(target, devices[0]), **target.describe(), "device_kind": devices[0].device_kind,
          "mesh": {"data": data, "fsdp": bool(cfg.mesh.fsdp)}, **figures,
          "kernels": hlo.custom_calls(text) if compiled else None, "compile_s": compile_s,
          "hlo_fingerprint": hlo.fingerprint(text) if compiled else None, "program": hlo.summary(text), "roofline": line}


def main(argv: list[str]) -> None:
  with open(argv[0], "rb") as f:
    request = pickle.load(f)
  cfg = request["cfg"]
  import jax  # noqa: PLC0415

  from tinyjax import env  # noqa: PLC0415
  env.apply_jax_options(cfg.env)  # the process environment (XLA_FLAGS, LIBTPU_INIT_ARGS, ...) came from the parent
  jax.config.update("jax_platforms", "cpu")
  try:
    result = compile_for(cfg, request["target"], request["search"], request.get("hlo_dir", ""))
  except ConfigError as e:
    result = {"error": f"{request['target'].name}: {e}"}
  print(json.dumps(result), flush=True)


if __name__ == "__main__":
  main(sys.argv[1:])
