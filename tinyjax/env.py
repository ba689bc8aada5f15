"""The one place that turns `config.env` into process settings, before anything initialises the JAX backend.

XLA reads its environment variables and flags once, when the backend starts, so a late setting would be silently
ignored: `apply` refuses to run after that. `None` in config.env leaves a setting as the environment has it; either
way `record()` captures what is actually in force, and the run stores it in run_info.json.
"""
from __future__ import annotations

import os

import jax

from tinyjax.errors import ConfigError
from tinyjax.runtime import files

# Recorded as settings: the variables JAX, XLA, libtpu, NCCL and CUDA read (each family by its prefix), and of the
# TF_ ones only those XLA's TSL runtime reads (logging and the GPU allocator): TF_ is also Terraform's prefix
# (TF_CLI_CONFIG_FILE, TF_LOG, TF_VAR_*), which no library of this process reads.
RECORDED_PREFIXES = ("XLA_", "JAX_", "LIBTPU_", "TPU_", "NCCL_", "CUDA_")
RECORDED_TF = ("TF_CPP_MIN_LOG_LEVEL", "TF_CPP_MAX_VLOG_LEVEL", "TF_CPP_MIN_VLOG_LEVEL", "TF_CPP_VMODULE",
               "TF_CPP_LOG_THREAD_ID", "TF_GPU_ALLOCATOR", "TF_FORCE_GPU_ALLOW_GROWTH", "TF_FORCE_UNIFIED_MEMORY")
# XLA's --xla_cpu_max_isa values, lowest first, and the /proc/cpuinfo flags that mark each (x86-64).
XLA_ISAS = (("SSE4_2", "sse4_2"), ("AVX", "avx"), ("AVX2", "avx2"), ("AVX512", "avx512f"),
            ("AVX512_VNNI", "avx512_vnni"), ("AVX512_BF16", "avx512_bf16"), ("AMX", "amx_bf16"),
            ("AMX_FP16", "amx_fp16"))
# config.env field -> environment variable it sets (verbatim).
ENV_VARS = {
    "platform": "JAX_PLATFORMS",
    "xla_python_client_preallocate": "XLA_PYTHON_CLIENT_PREALLOCATE",
    "xla_client_mem_fraction": "XLA_CLIENT_MEM_FRACTION",
    "xla_python_client_mem_fraction": "XLA_PYTHON_CLIENT_MEM_FRACTION",
    "xla_python_client_allocator": "XLA_PYTHON_CLIENT_ALLOCATOR",
    "tf_gpu_allocator": "TF_GPU_ALLOCATOR",
}
ALLOWED = {
    "xla_python_client_preallocate": ("true", "false"),
    "xla_python_client_allocator": ("default", "platform", "bfc", "cuda_async"),
    "gc_policy": ("default", "freeze", "disable"),
    "jax_default_matmul_precision": ("default", "high", "highest", "bfloat16", "tensorfloat32", "float32"),
}
JAX_OPTIONS = ("jax_platforms", "jax_threefry_partitionable", "jax_softmax_custom_jvp", "jax_default_matmul_precision",
               "jax_enable_x64", "jax_compilation_cache_dir")
MEM_FRACTION = ("XLA_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_MEM_FRACTION")
# Settings read by the runtime's device-memory allocator only (jaxlib xla_client.generate_pjrt_gpu_plugin_options and
# the TF_GPU_ALLOCATOR switch): how much memory is reserved and how, never what XLA compiles. By variable and by
# config.env field.
ALLOCATOR_ONLY = ("XLA_PYTHON_CLIENT_PREALLOCATE", "XLA_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_MEM_FRACTION",
                  "XLA_PYTHON_CLIENT_ALLOCATOR", "XLA_PYTHON_CLIENT_COLLECTIVE_MEM_SIZE_MB", "TF_GPU_ALLOCATOR",
                  "xla_python_client_preallocate", "xla_client_mem_fraction", "xla_python_client_mem_fraction",
                  "xla_python_client_allocator", "tf_gpu_allocator")


def backend_initialized() -> bool:
  from jax._src import xla_bridge  # private, but the only reliable probe (checked on jax 0.10.2)
  return bool(getattr(xla_bridge, "_backends", {}))


def _merge_flags(current: str, extra: list[str]) -> str:
  """Appends flags; a later --name=value replaces an earlier --name (so the config wins over the environment)."""
  merged: dict[str, str] = {}
  for flag in current.split() + extra:
    merged[flag.split("=", 1)[0]] = flag
  return " ".join(merged.values())


def _validate(e) -> None:
  for key, allowed in ALLOWED.items():
    value = e[key]
    if value is not None and value not in allowed:
      raise ConfigError(f"config.env.{key}={value!r} is invalid: allowed: {', '.join(allowed)}")
  if e.xla_client_mem_fraction is not None and e.xla_python_client_mem_fraction is not None:
    raise ConfigError("config.env.xla_client_mem_fraction and config.env.xla_python_client_mem_fraction are both set:"
                      " set only xla_client_mem_fraction (the other is its deprecated spelling)")
  for key in ("xla_client_mem_fraction", "xla_python_client_mem_fraction"):
    if e[key] is not None:
      try:
        ok = 0 < float(e[key]) <= 1
      except ValueError:
        ok = False
      if not ok:
        raise ConfigError(f"config.env.{key}={e[key]!r} is invalid: must be a number in (0, 1]")
  if e.gpu_autotune_level not in range(-1, 5):
    raise ConfigError(f"config.env.gpu_autotune_level={e.gpu_autotune_level} is invalid: allowed: -1 (leave), 0..4")
  if e.compilation_cache_dir is not None and "://" not in e.compilation_cache_dir:  # gs://...: JAX writes it
    _check_cache_dir(e.compilation_cache_dir)


def _check_cache_dir(cache_dir: str) -> None:
  """JAX accepts a file or an unwritable directory as its compilation cache, and warns at every compile."""
  path, why = os.path.expanduser(cache_dir), None
  if os.path.exists(path) and not os.path.isdir(path):
    why = "it is a file"
  else:
    try:
      files.probe_write(path)
    except OSError as err:
      why = err.strerror
  if why:
    raise ConfigError(f"config.env.compilation_cache_dir={cache_dir!r} is not a writable directory ({why}); choose "
                      "another directory or leave it unset")


def _check_xla_flags(xla_flags: str) -> None:
  """An unknown XLA flag aborts the process at backend start with an F-log line (exit 1); probing the flags in a
  child CPU process first (~2 s, only when config.env.xla_flags is set) turns that into a one-line error."""
  import subprocess  # noqa: PLC0415
  import sys  # noqa: PLC0415
  child_env = {**os.environ, "XLA_FLAGS": xla_flags, "JAX_PLATFORMS": "cpu"}
  probe = subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], env=child_env, capture_output=True,
                         text=True, check=False)
  bad = [line.split("Unknown flag in XLA_FLAGS:", 1)[1].strip() for line in probe.stderr.splitlines()
         if "Unknown flag in XLA_FLAGS:" in line]
  if bad:
    raise ConfigError(f"config.env.xla_flags: unknown XLA flag {bad[0]} (XLA would abort; see its flag list)")


def apply(e) -> dict:
  """Sets environment variables, XLA_FLAGS, LIBTPU_INIT_ARGS and jax.config options from config.env."""
  _validate(e)
  if backend_initialized():
    raise ConfigError("config.env must be applied before the JAX backend starts, but it has already started "
                      "(something called jax.devices() or ran a computation first); its settings would be ignored")
  for key, var in ENV_VARS.items():
    if e[key] is not None:
      os.environ[var] = str(e[key])
  if sum(v in os.environ for v in MEM_FRACTION) > 1:
    raise ConfigError("XLA_CLIENT_MEM_FRACTION and XLA_PYTHON_CLIENT_MEM_FRACTION are both set (config.env or the "
                      "environment): set only one")
  flags = []
  if e.host_device_count > 0:
    flags.append(f"--xla_force_host_platform_device_count={e.host_device_count}")
  if e.gpu_deterministic:  # reproducible GPU reductions; autotuning picks kernels by timing, so turn it off too
    flags += ["--xla_gpu_deterministic_ops=true", "--xla_gpu_autotune_level=0"]
  if e.gpu_autotune_level >= 0:
    flags.append(f"--xla_gpu_autotune_level={e.gpu_autotune_level}")
  flags += list(e.xla_flags)
  if e.xla_flags:
    _check_xla_flags(_merge_flags(os.environ.get("XLA_FLAGS", ""), flags))
  if flags:
    os.environ["XLA_FLAGS"] = _merge_flags(os.environ.get("XLA_FLAGS", ""), flags)
  if e.libtpu_init_args:
    os.environ["LIBTPU_INIT_ARGS"] = _merge_flags(os.environ.get("LIBTPU_INIT_ARGS", ""), list(e.libtpu_init_args))
  if e.platform is not None:  # JAX_PLATFORMS is read when jax is imported, which has happened: set the option too
    jax.config.update("jax_platforms", e.platform)
  skipped = _skip_absent_accelerator_plugins()
  apply_jax_options(e)
  return {**record(), "gc_policy": e.gc_policy, **({"skipped_plugins": skipped} if skipped else {})}


def _skip_absent_accelerator_plugins() -> list[str]:
  """A machine with the compile-only extras (tinyjax[tpu-compile], [cuda-compile]) but no TPU or GPU: JAX would load
  libtpu and the CUDA plugin when it starts (seconds, a dozen warning lines and a CUDA traceback), only to run on
  the CPU. When only the CPU was asked for, or nothing was and jax's own hardware probes (TPU chips on PCI,
  /dev/nvidia*) see neither, this is a CPU run: say so and skip plugin discovery. An accelerator asked for or
  visible leaves JAX's choice be."""
  from jax._src import hardware_utils, xla_bridge  # private, checked on jax 0.10.2 (the probes JAX itself uses)

  from tinyjax.hardware import targets  # noqa: PLC0415
  installed = [p for p in ("tpu", "cuda") if targets.compiler_installed(p)]
  asked = {p.strip() for p in (os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms or "").split(",")} - {""}
  if not installed or (asked and asked != {"cpu"}):
    return []
  if not asked and (hardware_utils.has_visible_nvidia_gpu() or hardware_utils.num_available_tpu_chips_and_device_id()[0]):
    return []
  jax.config.update("jax_platforms", "cpu")
  xla_bridge._plugins_registered = True  # noqa: SLF001 - their discovery would import them anyway
  return installed


def apply_jax_options(e) -> None:
  """The jax.config options of config.env (a child process inherits the environment variables, not these)."""
  jax.config.update("jax_threefry_partitionable", e.jax_threefry_partitionable)
  jax.config.update("jax_softmax_custom_jvp", e.jax_softmax_custom_jvp)
  jax.config.update("jax_enable_x64", e.jax_enable_x64)
  if e.jax_default_matmul_precision is not None:
    jax.config.update("jax_default_matmul_precision", e.jax_default_matmul_precision)
  if e.compilation_cache_dir is not None:
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(e.compilation_cache_dir))


def recorded(name: str) -> bool:
  """Whether an environment variable is a setting of this process's libraries (see RECORDED_PREFIXES)."""
  return name.startswith(RECORDED_PREFIXES) or name in RECORDED_TF


def _read(path: str) -> str | None:
  try:
    with open(path) as f:
      return f.read().strip()
  except OSError:
    return None


def host_cpu(cpuinfo: str | None = None, cache_dir: str = "/sys/devices/system/cpu/cpu0/cache",
             xla_flags: str | None = None) -> dict:
  """The host CPU as far as it can change the numbers: model, the ISA XLA's CPU compiler targets (the CPU's best,
  capped by --xla_cpu_max_isa), cpu0's caches, and the CPUs this process may use (XLA sizes its thread pool by them;
  1 vs 2 threads changes the tiny default's bits, BUILD_NOTES "Reproducibility")."""
  fields = {}
  for line in (cpuinfo if cpuinfo is not None else _read("/proc/cpuinfo") or "").splitlines():
    key, _, value = line.partition(":")
    if key.strip() and key.strip() not in fields:  # the first processor's block
      fields[key.strip()] = value.strip()
  flags = set(fields.get("flags", "").split())
  isas = [name for name, flag in XLA_ISAS if flag in flags]
  cap = next((f.split("=", 1)[1].upper() for f in reversed((xla_flags if xla_flags is not None else
                                                           os.environ.get("XLA_FLAGS", "")).split())
              if f.startswith("--xla_cpu_max_isa=")), None)
  names = [name for name, _ in XLA_ISAS]
  xla_isa = isas[-1] if isas else None
  if xla_isa and cap in names and names.index(cap) < names.index(xla_isa):
    xla_isa = cap
  caches = {}
  for index in sorted(os.listdir(cache_dir)) if os.path.isdir(cache_dir) else []:
    d = os.path.join(cache_dir, index)
    level, kind, size = (_read(os.path.join(d, f)) for f in ("level", "type", "size"))
    if level and size:
      caches[f"L{level}" + {"Data": "d", "Instruction": "i"}.get(kind or "", "")] = size
  return {"model": fields.get("model name"), "vendor": fields.get("vendor_id"),
          "family_model_stepping": "/".join(fields.get(k, "?") for k in ("cpu family", "model", "stepping")),
          "cpu_isa": isas[-1] if isas else None, "xla_isa": xla_isa, "caches": caches,
          "cpu_count": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0))}


def record() -> dict:
  """Environment variables and jax options in force now, whether or not config.env set them; and the host CPU."""
  env = {k: v for k, v in sorted(os.environ.items()) if recorded(k)}
  return {"environment": env, "jax_config": {name: getattr(jax.config, name) for name in JAX_OPTIONS},
          "host_cpu": host_cpu()}


def summary(record_: dict) -> str:
  """One console line of the settings that differ from a bare environment."""
  parts = [f"{k}={v}" for k, v in record_["environment"].items()]
  defaults = {"jax_threefry_partitionable": True, "jax_softmax_custom_jvp": False,
              "jax_default_matmul_precision": None, "jax_enable_x64": False, "jax_compilation_cache_dir": None}
  parts += [f"{k}={v}" for k, v in record_["jax_config"].items() if defaults.get(k, v) != v]
  if record_.get("gc_policy", "default") != "default":
    parts.append(f"gc_policy={record_['gc_policy']}")
  return "env: " + (", ".join(parts) if parts else "defaults (no XLA/JAX/TPU/CUDA variables set)")


def _refuse_absent_accelerators(platform: str | None) -> None:
  """A request for TPU or CUDA only, on a machine where jax's own probes see no such hardware, is refused before the
  plugin starts (libtpu would first print a dozen lines of its own initialisation errors)."""
  from jax._src import hardware_utils  # noqa: PLC0415 - private, checked on jax 0.10.2
  asked = {p.strip() for p in (platform or "").split(",")} - {""}
  present = {"tpu": hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0,
             "cuda": hardware_utils.has_visible_nvidia_gpu()}  # "gpu" may be ROCm: left to JAX
  if asked and asked <= set(present) and not any(present[p] for p in asked):
    raise ConfigError(f"config.env.platform={platform!r}: that backend cannot start here (no {' or '.join(sorted(asked))}"
                      " device on this machine; compiling for one needs no device: --dry_run --target=NAME)")


def start_backend(e) -> str:
  """Starts the backend config.env asked for; a requested platform that is absent is a ConfigError (a TPU request
  must never become a CPU run). Returns the backend in force."""
  _refuse_absent_accelerators(e.platform)
  try:
    backend = jax.default_backend()
  except Exception as err:  # noqa: BLE001 - jax raises RuntimeError / JaxRuntimeError / AssertionError by plugin
    why = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
    raise ConfigError(f"config.env.platform={e.platform!r}: that backend cannot start here ({why})") from err
  if e.platform is not None and backend not in {p.strip() for p in e.platform.split(",")} | (
      {"gpu"} if {"cuda", "rocm"} & {p.strip() for p in e.platform.split(",")} else set()):
    raise ConfigError(f"config.env.platform={e.platform!r} but the backend in force is {backend!r}")
  return backend
