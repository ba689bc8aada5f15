"""metrics.jsonl (one JSON object per logged step, process 0 only) and the console progress line.

The train loop hands every step's device metrics to `Logger.push`; only log steps are fetched, and a log step's
metrics are read after the next step has been dispatched (nanodo / early MaxText double buffering).
"""
from __future__ import annotations

import json
import os
import time

import jax


def _duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"


class Logger:

  def __init__(self, workdir: str, total_steps: int, tokens_per_step: int, log_every: int):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.total, self.tokens_per_step = total_steps, tokens_per_step
    self.log_every = log_every
    self.is_main = jax.process_index() == 0
    self.pending = None  # (step, device metrics) of the last log step, not yet fetched
    self.mark = None  # (step, time) of the previous fetch: throughput is measured between fetches
    self.last: dict = {}
    self.last_eval = ""

  def push(self, step: int, device_metrics: dict) -> None:
    self.flush()
    if step % self.log_every == 0 or step == self.total or step == 1:
      self.pending = (step, device_metrics)

  def flush(self) -> None:
    if self.pending is None:
      return
    step, values = self.pending
    self.pending = None
    row = {k: float(v) for k, v in jax.device_get(values).items()}
    now = time.perf_counter()
    row["tokens"] = step * self.tokens_per_step
    if self.mark is not None and step > self.mark[0]:
      rate = (step - self.mark[0]) / (now - self.mark[1])
      row["tokens_per_second"] = rate * self.tokens_per_step
      row["eta_seconds"] = (self.total - step) / rate
    self.mark = (step, now)  # step 1 includes compilation, so throughput starts from the second fetch
    self.last = row
    self.write(step, row)

  def write(self, step: int, row: dict) -> None:
    evals = sorted({k.split("/")[1] for k in row if k.startswith("eval/")})
    if evals:
      self.last_eval = " | ".join(f"{n} bpb {row[f'eval/{n}/bpb']:.4f}" for n in evals)
      self.mark = (step, time.perf_counter())  # eval time is not training throughput
    if not self.is_main:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps({"step": step, **row}, sort_keys=True) + "\n")
    parts = [f"step {step}/{self.total}"]
    if evals:
      parts += [f"eval {n}: loss {row[f'eval/{n}/loss']:.4f} bpb {row[f'eval/{n}/bpb']:.4f}" for n in evals]
    else:
      parts.append(f"loss {row['loss']:.4f}")
      if self.last_eval:
        parts.append(self.last_eval)
    if "tokens_per_second" in row:
      parts += [f"{row['tokens_per_second'] / 1e3:.1f}k tok/s", f"ETA {_duration(row['eta_seconds'])}"]
    print(" | ".join(parts), flush=True)
