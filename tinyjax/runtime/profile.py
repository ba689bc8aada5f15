"""The profile of a training run (config.train.profile_steps="START:STOP"): a jax.profiler trace of the steps after
START through STOP in WORKDIR/profile (TensorBoard's profile plugin / XProf read it), and at the end of the run the
measured time per step of each part of the model beside the roofline's bound for this device (hardware/roofline.py),
printed and written to WORKDIR/profile/summary.json. Process 0 alone traces.

Measured: the durations of the trace's per-HLO-op events of the train step's module (the `hlo_op` of XLA's runtime
events: the CPU's thunks run on host threads, a GPU's or TPU's kernels in /device: processes, preferred when present),
on one device, each less the op events nested inside it, summed by part and divided by the traced steps. Ops that
run concurrently (the CPU's thread pool) each count in full, so the total can exceed the wall time per step.
"""
from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import time

import jax

from tinyjax import config
from tinyjax.hardware import roofline, targets
from tinyjax.runtime import files

DIR, SUMMARY = "profile", "summary.json"  # WORKDIR/profile/plugins/profile/<run>/<host>.{xplane.pb,trace.json.gz}
UNATTRIBUTED = "unattributed"  # op events of the step's module whose name is no kernel of the compiled step
MAX_EVENTS = 1_000_000  # XLA's trace.json export drops events beyond this many (MaybeDropEventsForTraceViewer)
_ANNOTATION = re.compile(r"\bhlo_(op|module)=([\w.\-]+)")  # "fusion.3:#hlo_op=fusion.3,hlo_module=jit_step#"


def _hlo(event: dict, key: str) -> str | None:
  """The event's hlo_op / hlo_module: an argument, else from an XLA annotation in its name or arguments."""
  args = event.get("args") or {}
  if key in args:
    return str(args[key])
  for text in (event.get("name", ""), *map(str, args.values())):
    for found, value in _ANNOTATION.findall(text):
      if f"hlo_{found}" == key:
        return value
  return None


def _self_times(events: list[dict]) -> list[tuple[dict, float]]:
  """(event, µs) with each event's duration less the events nested in it on its thread (a loop and its body)."""
  out, threads = [], collections.defaultdict(list)
  for e in events:
    threads[e.get("pid"), e.get("tid")].append(e)
  for evs in threads.values():
    stack = []
    for e in sorted(evs, key=lambda e: (e["ts"], -e["dur"])):
      while stack and stack[-1][0]["ts"] + stack[-1][0]["dur"] <= e["ts"]:
        out.append(tuple(stack.pop()))
      if stack:
        stack[-1][1] -= e["dur"]
      stack.append([e, e["dur"]])
    out += [tuple(s) for s in stack]
  return out


def op_seconds(trace: dict, parts: dict[str, str], module: str | None) -> tuple[dict[str, float], int]:
  """({part or UNATTRIBUTED: seconds}, op events counted) of `module`'s op events on one device (the first) of a
  chrome-format trace; `parts` is {kernel name: part} (roofline.by_instruction)."""
  events = trace.get("traceEvents", [])
  procs = {e.get("pid"): e["args"].get("name", "") for e in events if e.get("name") == "process_name"}
  ops = [e for e in events if e.get("ph") == "X" and "dur" in e
         and (_hlo(e, "hlo_op") is not None or e.get("name", "").lstrip("%") in parts)]
  on_device = [e for e in ops if procs.get(e.get("pid"), "").startswith("/device:") and "CUSTOM" not in procs[e["pid"]]]
  ops = [e for e in on_device or ops if module is None or _hlo(e, "hlo_module") in (None, module)]

  def device(e):
    ordinal = str((e.get("args") or {}).get("device_ordinal", "0"))
    return e.get("pid", 0), int(ordinal) if ordinal.isdigit() else 0
  first = min(map(device, ops), default=None)
  seconds = collections.defaultdict(float)
  counted = _self_times([e for e in ops if device(e) == first])
  for e, us in counted:
    seconds[parts.get(_hlo(e, "hlo_op") or e["name"].lstrip("%"), UNATTRIBUTED)] += us * 1e-6
  return dict(seconds), len(counted)


def read_trace(directory: str) -> tuple[dict, str]:
  """(the newest trace's chrome-format events, its path) under a jax.profiler log directory."""
  paths = glob.glob(os.path.join(directory, "plugins", "profile", "*", "*.trace.json.gz"))
  if not paths:
    raise FileNotFoundError(f"no *.trace.json.gz under {directory}/plugins/profile")
  path = max(paths, key=os.path.getmtime)
  with gzip.open(path, "rt", encoding="utf-8") as f:
    return json.load(f), path


def table(summary: dict) -> str:
  """The printed report: part | measured ms/step | share | roofline ms/step | share, then the totals."""
  first, last = summary["first_step"], summary["last_step"]
  lines = [f"profile of {f'steps {first}-{last}' if last > first else f'step {last}'} in {summary['directory']}: "
           f"{summary['wall_ms_per_step']:.2f} ms/step wall, {summary['op_events']} op events on one device",
           f"{'part':<16} {'measured ms/step':>16} {'share':>6} {'roofline ms/step':>16} {'share':>6}"]
  for part, row in summary["parts"].items():
    bound = "-" if row["bound_ms"] is None else f"{row['bound_ms']:.3f}"
    share = "-" if row["bound_share"] is None else f"{row['bound_share']:.0%}"
    lines.append(f"{part:<16} {row['measured_ms']:>16.3f} {row['measured_share']:>6.0%} {bound:>16} {share:>6}")
  total = summary["total"]
  bound = "-" if total["bound_ms"] is None else f"{total['bound_ms']:.3f}"
  lines.append(f"{'total':<16} {total['measured_ms']:>16.3f} {'':>6} {bound:>16}")
  peaks = f": {summary['peak_flops'] / 1e12:.3g} TFLOP/s, {summary['hbm_bandwidth'] / 1e9:.3g} GB/s" \
      if summary.get("peak_flops") else ""
  lines.append(f"roofline of {summary['device']}: {summary['chip_source']}{peaks}")
  return "\n".join(lines)


def summarize(trace: dict, parts: dict[str, str], module: str | None, steps: int, prediction: dict | None) -> dict:
  """Measured ms/step of each part (roofline.PARTS, then UNATTRIBUTED) beside `prediction` (roofline.step_report;
  None: no bound), with each one's share of its total."""
  measured, events = op_seconds(trace, parts, module)
  total = sum(measured.values())
  bound_total = prediction["bound_s"] if prediction else None
  rows = {}
  for part in (*roofline.PARTS, UNATTRIBUTED):
    bound = prediction["by_part"][part]["bound_s"] if prediction and part in prediction["by_part"] else None
    rows[part] = {"measured_ms": measured.get(part, 0.0) / steps * 1e3,
                  "measured_share": measured.get(part, 0.0) / total if total else 0.0,
                  "bound_ms": None if bound is None else bound * 1e3,
                  "bound_share": bound / bound_total if bound is not None and bound_total else None}
  return {"parts": rows, "op_events": events, "total": {
      "measured_ms": total / steps * 1e3, "bound_ms": None if bound_total is None else bound_total * 1e3}}


def write(summary: dict, wd) -> None:
  """Prints the table and writes summary.json; a remote workdir (traced into its local mirror: the profiler writes
  local files) gets the whole profile folder copied up."""
  print(table(summary), flush=True)
  directory = os.path.join(wd.local, DIR)
  files.atomic_write(os.path.join(directory, SUMMARY), json.dumps(summary, indent=2))
  if wd.remote:
    wd.fs.put(directory + "/", f"{wd.root}/{DIR}/", recursive=True)


class Profiler:
  """Traces the steps first+1..stop of the loop (`before` each dispatch, `after` each step) and reports them."""

  def __init__(self, first: int, stop: int, wd):
    self.first, self.stop, self.wd = first, stop, wd
    self.directory = os.path.join(wd.local, DIR)
    self.tracing, self.t0, self.wall = False, 0.0, None

  @classmethod
  def open(cls, spec: str, wd, start_step: int) -> "Profiler | None":
    """The profiler of a run resumed at start_step; None when off, past (a resume after STOP) or not process 0."""
    window = config.profile_window(spec)
    if window is None or jax.process_index() != 0:
      return None
    if start_step >= window[1]:
      print(f"profile_steps {spec}: the run resumes at step {start_step}, after the window: not traced", flush=True)
      return None
    return cls(max(window[0], start_step), window[1], wd)

  def before(self, n: int, state) -> None:
    if n == self.first + 1:
      jax.block_until_ready(state)  # the trace holds whole steps: none of the previous ones
      jax.profiler.start_trace(self.directory)
      self.tracing, self.t0 = True, time.perf_counter()

  def after(self, n: int, outputs) -> None:
    if n == self.stop and self.tracing:
      jax.block_until_ready(outputs)
      self.wall = (time.perf_counter() - self.t0) / (self.stop - self.first)
      self.close()

  def close(self) -> None:
    """Ends the trace (also when the run stops inside the window: the trace is kept, no summary)."""
    if self.tracing:
      self.tracing = False
      jax.profiler.stop_trace()

  def report(self, compiled, model_cfg, batch: int, mesh) -> dict | None:
    """The window's summary, printed and written (write); None if it was not traced to its end."""
    if self.wall is None:
      return None
    trace, path = read_trace(self.directory)
    device, hlo_text = mesh.devices.flat[0], compiled.as_text()
    try:
      prediction = targets.local_roofline(hlo_text, model_cfg, batch, mesh.size, device)
      source = prediction["chip_source"]
    except config.ConfigError as e:  # an accelerator without known peaks: measured figures only
      prediction, source = None, f"no roofline ({e})"
    module = re.match(r"HloModule\s+([\w.\-]+)", hlo_text)
    summary = {"first_step": self.first + 1, "last_step": self.stop, "directory": f"{self.wd.path}/{DIR}",
               "trace": os.path.relpath(path, self.directory), "device": device.device_kind,
               "platform": device.platform, "chip_source": source, "peak_flops": prediction and prediction["peak_flops"],
               "hbm_bandwidth": prediction and prediction["hbm_bandwidth"], "wall_ms_per_step": self.wall * 1e3,
               **summarize(trace, roofline.by_instruction(hlo_text), module.group(1) if module else None,
                           self.stop - self.first, prediction)}
    if len(trace.get("traceEvents", [])) >= MAX_EVENTS:
      print(f"profile: the trace holds {MAX_EVENTS:,} events, where XLA's export drops the rest: the measured times "
            "are too low; trace fewer steps", flush=True)
    write(summary, self.wd)
    return summary
