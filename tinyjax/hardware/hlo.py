"""Readers of a compiled module's optimized HLO text (the target compilers' and the local one's): its kernels, a
fingerprint of the program, what it is made of, the compiler's own cost estimate, and the file the tools read it from.
"""
from __future__ import annotations

import collections
import hashlib
import os
import re


def custom_calls(hlo_text: str) -> list[str]:
  """The custom-call targets in an optimized HLO module: the kernels XLA did not generate itself (Pallas/Mosaic
  `tpu_custom_call`, Triton `__gpu$xla.gpu.triton`, cuBLAS `__cublas$gemm`, ...)."""
  return sorted(set(re.findall(r'custom_call_target="([^"]+)"', hlo_text)))


_NOISE = (re.compile(r", metadata=\{[^}]*\}"), re.compile(r"^HloModule \S+", re.M))


def fingerprint(hlo_text: str) -> str:
  """SHA-256 of the optimized program with source metadata and the module name stripped: equal fingerprints mean
  the compiler produced the same program."""
  text = hlo_text
  for pattern in _NOISE:
    text = pattern.sub("", text)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def summary(hlo_text: str) -> dict:
  """Counts that say what a program is made of: instructions by opcode, fusions by kind (and by backend kind,
  e.g. __triton_gemm), kernels (custom-call targets)."""
  ops = collections.Counter(re.findall(r"^\s*(?:ROOT )?%?\S+ = \S+ ([a-z][\w-]*)\(", hlo_text, re.M))
  fusions = collections.Counter(re.findall(r"\bkind=(k\w+)", hlo_text))
  fusions.update(f"backend:{k}" for k in re.findall(r'"kind":"(__\w+)"', hlo_text))
  kernels = collections.Counter(re.findall(r'custom_call_target="([^"]+)"', hlo_text))
  return {"ops": dict(sorted(ops.items())), "fusions": dict(sorted(fusions.items())),
          "kernels": dict(sorted(kernels.items()))}


def write_module(hlo_dir: str, name: str, text: str) -> str:
  """HLO_DIR/NAME.hlo.txt: a compiled module's optimized text, for the checks and tools that read it."""
  os.makedirs(hlo_dir, exist_ok=True)
  path = os.path.join(hlo_dir, f"{name}.hlo.txt")
  with open(path, "w") as f:
    f.write(text)
  return path


def compiler_estimate(compiled) -> dict | None:
  """XLA's own cost analysis of a compiled module where the compiler gives one (libtpu: optimal_seconds; the CUDA
  plugin gives nothing), labelled: its while-loop bodies count once, not times their trip counts."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # noqa: BLE001 - a backend without a cost model
    return None
  cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
  if not cost:
    return None
  keys = ("optimal_seconds", "flops", "bytes accessed", "transcendentals")
  return {**{k.replace(" ", "_"): cost[k] for k in keys if k in cost},
          "caveat": "XLA cost_analysis: while-loop bodies counted once (not times their trip counts)"}
