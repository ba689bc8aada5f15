"""Named compile targets: the GPUs and Cloud TPU slices a run can be planned for without holding one.

  h100, h200, a100-40gb, a100-80gb   one NVIDIA GPU ("8xh100": eight on one host, "2x8xh100": two such hosts); the
                                     CUDA compiler is given a target config (target_configs/NAME.txtpb), no device
  v4-N, v5p-N, v5e-N, v6e-N          a Cloud TPU slice by its accelerator type (v5litepod-N = v5e-N); libtpu builds
                                     the slice's topology. Chips and hosts as Cloud TPU counts them: v4/v5p-N have
                                     N/2 chips (N counts TensorCores; v5p-32 is 16 chips), 4 per host; v5e/v6e-N
                                     have N chips, one host up to 8, else 4 per host.

A target only describes hardware; tinyjax/aot.py compiles the train step for it in a separate process.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re

from tinyjax.errors import ConfigError

GIB = 2 ** 30
CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "target_configs")
# GPU name -> (target config file, peak bf16 FLOP/s per chip: tinyjax.flops.PEAK_FLOPS's sources, HBM bandwidth
# and NVLink bandwidth per direction in bytes/s: NVIDIA data sheets, H100 SXM 3.35 TB/s, H200 4.8 TB/s, A100 40GB
# 1,555 GB/s, A100 80GB SXM 2,039 GB/s; NVLink 900 GB/s (H100/H200) and 600 GB/s (A100) counted both ways).
GPUS = {"h100": ("h100.txtpb", 989.5e12, 3.35e12, 450e9), "h200": ("h200.txtpb", 989.5e12, 4.8e12, 450e9),
        "a100-40gb": ("a100-40gb.txtpb", 312e12, 1.555e12, 300e9),
        "a100-80gb": ("a100-80gb.txtpb", 312e12, 2.039e12, 300e9)}
SMS = {"h100": 132, "h200": 132, "a100-40gb": 108, "a100-80gb": 108}  # streaming multiprocessors (data sheets)
# TPU family -> (libtpu topology prefix, HBM per chip, peak bf16 FLOP/s per chip, chip config, HBM bandwidth, ICI
# bandwidth per chip, bytes/s). Cloud TPU system architecture pages: HBM v4 32 GiB, v5p 95 GiB, v5e 16 GiB, v6e
# 32 GiB; 275/459/197/918 TFLOP/s; HBM bandwidth 1,200 / 2,765 / 819 / 1,640 GB/s; interchip interconnect 2,400 /
# 4,800 / 1,600 / 3,584 Gbps. v4 and v5p chips have two TensorCores that JAX drives as one device ("megacore");
# v5e/v6e chips have one.
TPUS = {"v4": ("v4", 32 * GIB, 275e12, "megacore", 1.2e12, 300e9),
        "v5p": ("v5p", 95 * GIB, 459e12, "megacore", 2.765e12, 600e9),
        "v5e": ("v5e", 16 * GIB, 197e12, "default", 0.819e12, 200e9),
        "v6e": ("v6e", 32 * GIB, 918e12, "default", 1.64e12, 448e9)}
TPU_ALIASES = {"v5litepod": "v5e"}
EXTRAS = {"tpu": "tpu-compile", "cuda": "cuda-compile"}  # pyproject extra that installs each platform's compiler


@dataclasses.dataclass(frozen=True)
class Target:
  name: str
  platform: str  # "tpu" | "cuda"
  chips: int  # devices of the mesh (one JAX device per chip)
  hosts: int
  topology: str  # libtpu "v5p:2x2x4" | CUDA "1x1x8" (slices x hosts x devices per host)
  memory_bytes: float  # HBM of one chip
  peak_flops: float  # bf16 FLOP/s of one chip
  hbm_bandwidth: float = 0.0  # bytes/s of one chip's HBM
  link_bandwidth: float = 0.0  # bytes/s one chip sends over NVLink / ICI
  chip_config: str = ""  # TPU: "megacore" | "default"
  chips_per_host: tuple[int, ...] = ()  # TPU: the host's chip bounds
  target_config: str = ""  # CUDA: path of the GpuTargetConfig text proto
  programs: int = 1  # kernel programs that run at once (a GPU's SMs; roofline.Chip.programs)

  @property
  def extra(self) -> str:
    return EXTRAS[self.platform]

  @property
  def chip(self):
    from tinyjax.hardware import roofline  # noqa: PLC0415
    return roofline.Chip(self.peak_flops, self.hbm_bandwidth, self.link_bandwidth, self.programs)

  def describe(self) -> dict:
    return {"platform": self.platform, "chips": self.chips, "hosts": self.hosts, "topology": self.topology,
            "device_memory_gib": round(self.memory_bytes / GIB, 2)}


def names() -> list[str]:
  """The names the README and --help list (any N of the patterns works)."""
  return [*GPUS, "8xh100", "v4-8", "v5p-8", "v5p-16", "v5p-32", "v5p-64", "v5e-8", "v6e-8"]


def _doubling(chips: int, start: tuple[int, ...], order: tuple[int, ...]) -> tuple[int, ...]:
  """Cloud TPU's default slice shapes: from `start`, double the axes in `order` (cyclically) until `chips` chips:
  v4/v5p 2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4, 4x4x8, ...; v5e/v6e 1x1, 1x2, 2x2, 2x4, 4x4, 4x8, ..."""
  shape, i = list(start), 0
  while math.prod(shape) < chips:
    shape[order[i % len(order)]] *= 2
    i += 1
  return tuple(shape)


def _tpu(name: str, family: str, cores_or_chips: int) -> Target:
  prefix, hbm, peak, chip_config, bandwidth, link = TPUS[family]
  if family in ("v4", "v5p"):  # the number counts TensorCores: 2 per chip; 3-D torus, 4 chips per host
    chips = cores_or_chips // 2
    if cores_or_chips % 8 or chips & (chips - 1):
      raise ValueError
    shape = _doubling(chips, (2, 2, 2), (2, 1, 0)) if chips > 4 else (2, 2, 1)
    per_host, hosts = (2, 2, 1), chips // 4
  else:  # v5e / v6e: the number counts chips; 2-D, a single host up to 8 chips, else 4 per host
    chips = cores_or_chips
    if chips not in (1, 4, 8, 16, 32, 64, 128, 256):  # the slice sizes Cloud TPU offers
      raise ValueError
    shape = _doubling(chips, (1, 1), (1, 0))
    per_host = (2, 4, 1) if chips == 8 else (2, 2, 1) if chips > 8 else (*shape, 1)
    hosts = 1 if chips <= 8 else chips // 4
  return Target(name, "tpu", chips, hosts, f"{prefix}:{'x'.join(map(str, shape))}", hbm, peak, bandwidth, link,
                chip_config, per_host)


def parse(name: str) -> Target:
  """A Target from its name; an unknown name is a ConfigError listing what is allowed."""
  key = name.strip().lower()
  gpu = re.fullmatch(r"(?:(\d+)x(?=\d+x))?(?:(\d+)x)?([a-z0-9-]+)", key)  # [HOSTSx][GPUSx]NAME
  if gpu and gpu.group(3) in GPUS:
    hosts, per_host = int(gpu.group(1) or 1), int(gpu.group(2) or 1)
    if not 1 <= per_host <= 8 or hosts < 1:
      raise ConfigError(f"--target={name}: 1 to 8 GPUs per host (e.g. 8xh100, or 2x8xh100 for two hosts)")
    file, peak, bandwidth, link = GPUS[gpu.group(3)]
    path = os.path.join(CONFIG_DIR, file)
    return Target(key, "cuda", hosts * per_host, hosts, f"1x{hosts}x{per_host}", gpu_memory_bytes(path), peak,
                  bandwidth, link, target_config=path, programs=SMS[gpu.group(3)])
  tpu = re.fullmatch(r"(v4|v5p|v5e|v6e|v5litepod)-(\d+)", key)
  if tpu:
    family = TPU_ALIASES.get(tpu.group(1), tpu.group(1))
    try:
      return _tpu(key, family, int(tpu.group(2)))
    except ValueError:
      pass
  raise ConfigError(f"--target={name} is not a known target: allowed: {', '.join(GPUS)} (optionally [HOSTSx]GPUSx, "
                    "e.g. 8xh100, 2x8xh100), "
                    "v4-N and v5p-N (N = 8, 16, 32, ... TensorCores), v5e-N and v6e-N (N = 1, 4, 8, 16, ... chips)")


def parse_list(text: str) -> list[Target]:
  return [parse(n) for n in text.split(",") if n.strip()]


def gpu_memory_bytes(path: str) -> float:
  """device_memory_size of a GpuTargetConfig text proto (what the CUDA driver reports as the device's total)."""
  with open(path) as f:
    return float(re.search(r"device_memory_size:\s*(\d+)", f.read()).group(1))


def compiler_installed(platform: str) -> bool:
  """Whether this environment has the platform's compiler: libtpu, or the CUDA PJRT plugin (jax[cuda12-local])."""
  module = {"tpu": "libtpu", "cuda": "jax_plugins.xla_cuda12"}[platform]
  try:
    return importlib.util.find_spec(module) is not None
  except ModuleNotFoundError:
    return False


def install_hint(platform: str) -> str:
  return f"pip install -e '.[{EXTRAS[platform]}]'"


# jax.Device.device_kind (substring, most specific first) -> the GPUS / TPUS entry whose peaks it has.
_KIND_TABLE = (("H100", ("gpu", "h100")), ("H200", ("gpu", "h200")), ("A100-SXM4-40GB", ("gpu", "a100-40gb")),
               ("A100-PCIE-40GB", ("gpu", "a100-40gb")), ("A100", ("gpu", "a100-80gb")),
               ("TPU v6", ("tpu", "v6e")), ("TPU v5 lite", ("tpu", "v5e")), ("TPU v5e", ("tpu", "v5e")),
               ("TPU v5", ("tpu", "v5p")), ("TPU v4", ("tpu", "v4")))


def local_chip(device) -> tuple[object, str]:
  """(roofline.Chip, where its figures come from) of a JAX device: the data-sheet tables for a known GPU or TPU,
  measured for a CPU (`measure_cpu`); an unknown accelerator is a ConfigError."""
  from tinyjax.hardware import roofline  # noqa: PLC0415
  for key, (kind, name) in _KIND_TABLE:
    if key.lower() in device.device_kind.lower():
      if kind == "gpu":
        _, peak, bandwidth, link = GPUS[name]
      else:
        _, _, peak, _, bandwidth, link = TPUS[name]
      return roofline.Chip(peak, bandwidth, link, SMS.get(name, 1)), f"data sheet ({name})"
  if device.platform == "cpu":
    peak, bandwidth = measure_cpu()
    return roofline.Chip(peak, bandwidth), "measured on this CPU (float32 matmul, array copy)"
  raise ConfigError(f"no peak figures for device kind {device.device_kind!r}: known are "
                    f"{', '.join(k for k, _ in _KIND_TABLE)}")


def local_roofline(hlo_text: str, model_cfg, batch: int, devices: int, device, top: int = 10) -> dict:
  """roofline.step_report of a step compiled for this machine's `device`, against its own peaks (local_chip), with
  where those come from ("chip_source")."""
  from tinyjax.hardware import roofline  # noqa: PLC0415
  chip, source = local_chip(device)
  return {**roofline.step_report(hlo_text, model_cfg, batch, devices, chip, device.platform, top),
          "chip_source": source}


def measure_cpu(size: int = 1024, copy_mib: int = 256, repeats: int = 5) -> tuple[float, float]:
  """(matmul FLOP/s, memory bytes/s) of this CPU as XLA's CPU backend reaches them: the best of `repeats` float32
  [size, size] matmuls, and of copies of a `copy_mib` MiB array (read + write). A CPU's roofline is its own."""
  import time  # noqa: PLC0415

  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  a = jnp.ones((size, size), jnp.float32)
  x = jnp.ones((copy_mib * 2 ** 20 // 4,), jnp.float32)
  matmul, copy = jax.jit(lambda a: a @ a), jax.jit(lambda x: x + 1.0)

  def best(fn, arg):
    fn(arg).block_until_ready()
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      fn(arg).block_until_ready()
      times.append(time.perf_counter() - start)
    return min(times)
  return 2.0 * size ** 3 / best(matmul, a), 2.0 * x.size * 4 / best(copy, x)
