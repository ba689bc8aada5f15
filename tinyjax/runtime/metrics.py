"""metrics.jsonl (one JSON object per logged step, process 0 only) and the console progress line.

The train loop hands every step's device metrics to `Logger.push`; only log steps are fetched, and a log step's
metrics are read after the next step has been dispatched (nanodo / early MaxText double buffering).
"""
from __future__ import annotations

import json
import os
import time

import jax

from tinyjax.runtime import files
from tinyjax.runtime.workdir import METRICS as FILE


def _lines(path: str):
  """(line, row) for every whole line of a metrics file; a line torn by a kill mid-write is skipped."""
  if not os.path.exists(path):
    return
  with open(path, "rb") as f:
    for number, raw in enumerate(f, 1):
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:  # not a torn write (those are cut, not garbled): someone edited the file
        from tinyjax.errors import ConfigError  # noqa: PLC0415
        raise ConfigError(f"{path} line {number} is not UTF-8 ({e.reason}): repair or remove that line") from e
      try:
        yield line, json.loads(line)
      except json.JSONDecodeError:
        continue


def read(workdir: str, name: str = FILE) -> list[dict]:
  """The rows of workdir/metrics.jsonl (the one reader of the file: results, plot, envdiff use it; dynamics.jsonl)."""
  return [row for _, row in _lines(os.path.join(workdir, name))]


def append(workdir: str, row: dict, name: str = FILE) -> None:
  """One row appended to workdir/metrics.jsonl (the one writer of its lines; dynamics.jsonl too)."""
  with open(os.path.join(workdir, name), "a") as f:
    f.write(json.dumps(row, sort_keys=True) + "\n")


def _truncate(path: str, last_step: int) -> None:
  """Drops rows after last_step (a resumed run rewrites them), so the file equals an uninterrupted run's."""
  if not os.path.exists(path):
    return
  rows = [line for line, row in _lines(path) if row.get("step", last_step + 1) <= last_step]
  files.atomic_write(path, "".join(rows))


truncate = _truncate  # dynamics.jsonl is cut back on resume exactly as metrics.jsonl


def _duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"


class Logger:

  def __init__(self, workdir: str, total_steps: int, tokens_per_step: int, log_every: int, start_step: int = 0,
               training_time: float = 0.0):
    self.workdir, self.path = workdir, os.path.join(workdir, FILE)
    if jax.process_index() == 0:
      _truncate(self.path, start_step)
    self.total, self.tokens_per_step = total_steps, tokens_per_step
    self.log_every = log_every
    self.is_main = jax.process_index() == 0
    self.pending = None  # (step, device metrics) of the last log step, not yet fetched
    self.mark = (start_step, time.perf_counter())  # (step, time) of the previous fetch: throughput is measured
    self.first_step = start_step + 1  # between fetches, starting after the first (compiling) step
    self.training_time = training_time  # Marin's training_time: summed step wall time incl. compile, excl. eval
    self.last: dict = {}
    self.last_eval = ""
    self.sinks = []  # tracking.Tracker (TensorBoard, W&B): every numeric row is mirrored there

  def push(self, step: int, device_metrics: dict) -> dict | None:
    """Queues this step's metrics if it is a log step; returns the previously queued row, now fetched."""
    row = self.flush()
    # Step 1 of a fresh run is always logged; a resumed run logs exactly the rows an uninterrupted run would.
    if step % self.log_every == 0 or step == self.total or step == 1:
      self.pending = (step, device_metrics)
    return row

  def flush(self) -> dict | None:
    if self.pending is None:
      return None
    step, values = self.pending
    self.pending = None
    row = {k: float(v) for k, v in jax.device_get(values).items()}
    now = time.perf_counter()
    row["tokens"] = step * self.tokens_per_step
    self.training_time += now - self.mark[1]
    row["training_time"] = self.training_time
    if self.mark[0] >= self.first_step and step > self.mark[0]:
      rate = (step - self.mark[0]) / (now - self.mark[1])
      row["tokens_per_second"] = rate * self.tokens_per_step
      row["eta_seconds"] = (self.total - step) / rate
    self.mark = (step, now)
    self.last = row
    self.write(step, row)
    return {"step": step, **row}

  def event(self, step: int, kind: str, message: str) -> None:
    """A run event (preempted, diverged, loss_spike, ...): a metrics.jsonl row and a console line."""
    if self.is_main:
      append(self.workdir, {"step": step, "event": kind, "message": message})
      print(f"step {step}/{self.total} | {kind}: {message}", flush=True)

  def write(self, step: int, row: dict) -> None:
    evals = sorted({k[len("eval/"):-len("/bpb")] for k in row if k.startswith("eval/") and k.endswith("/bpb")})
    if evals:
      self.last_eval = " | ".join(f"{n} bpb {row[f'eval/{n}/bpb']:.4f}" for n in evals)
      self.mark = (step, time.perf_counter())  # eval time is neither training time nor throughput
    if not self.is_main:
      return
    append(self.workdir, {"step": step, **row})
    for sink in self.sinks:
      sink.write(step, row)
    parts = [f"step {step}/{self.total}"]
    if evals:
      parts += [f"eval {n}: loss {row[f'eval/{n}/loss']:.4f} bpb {row[f'eval/{n}/bpb']:.4f}" for n in evals]
    elif "loss" in row:
      parts.append(f"loss {row['loss']:.4f}")
      if self.last_eval:
        parts.append(self.last_eval)
    else:
      parts += [f"{k} {v}" for k, v in sorted(row.items())]
    if "tokens_per_second" in row:
      parts += [f"{row['tokens_per_second'] / 1e3:.1f}k tok/s", f"ETA {_duration(row['eta_seconds'])}"]
    print(" | ".join(parts), flush=True)
