"""A run's health on the host: the non-finite guard's record (which values went non-finite, at which step) and
loss-spike warnings."""
from __future__ import annotations

import collections

NONFINITE = ((1, "loss"), (2, "grad_norm"), (4, "parameters or optimizer state after the update"))  # bits of TrainState.bad_what


def nonfinite(bits: int) -> str:
  return " and ".join(name for bit, name in NONFINITE if bits & bit) or "?"


def divergence(row: dict) -> str | None:
  """The record of the first non-finite step in a metrics row, or None."""
  if row.get("first_bad_step", -1) < 0:
    return None
  return f"non-finite {nonfinite(int(row['bad_what']))} at step {int(row['first_bad_step'])}"


class SpikeDetector:
  """Warns when a logged loss exceeds `ratio` x the mean of the previous `window` logged losses."""

  def __init__(self, ratio: float, window: int):
    self.ratio, self.history = ratio, collections.deque(maxlen=window)

  def __call__(self, loss: float) -> str | None:
    spike = None
    if self.ratio > 0 and len(self.history) >= min(5, self.history.maxlen):
      mean = sum(self.history) / len(self.history)
      if loss > self.ratio * mean:
        spike = f"loss spike: {loss:.4f} > {self.ratio} x running mean {mean:.4f}"
    self.history.append(loss)
    return spike
