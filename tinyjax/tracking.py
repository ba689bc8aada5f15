"""Mirrors of metrics.jsonl and dynamics.jsonl for experiment trackers: TensorBoard event files in
workdir/tensorboard (tensorboardX: no TensorFlow needed) and, optionally, Weights & Biases (train.wandb_project;
`pip install tinyjax[wandb]`). Process 0 only. The JSONL files stay the record; trackers are views of them.
"""
from __future__ import annotations

import hashlib
import json
import math
import os

import jax

from tinyjax.config import ConfigError

TB_DIR = "tensorboard"


class Tracker:

  def __init__(self, workdir: str, cfg, start_step: int):
    self.tb = self.wandb = None
    if jax.process_index() != 0:
      return
    if cfg.train.tensorboard:
      from tensorboardX import SummaryWriter  # noqa: PLC0415
      # purge_step: a resumed run rewrites the steps after its checkpoint; TensorBoard drops the old copies.
      self.tb = SummaryWriter(os.path.join(workdir, TB_DIR), purge_step=start_step + 1 if start_step else None)
    if cfg.train.wandb_project:
      try:
        import wandb  # noqa: PLC0415
      except ImportError as e:
        raise ConfigError("config.train.wandb_project is set but wandb is not installed: "
                          "pip install 'tinyjax[wandb]' (or set it to '')") from e
      run_id = hashlib.sha256(os.path.abspath(workdir).encode()).hexdigest()[:16]  # same run across resumes
      self.wandb = wandb.init(project=cfg.train.wandb_project, id=run_id, resume="allow", dir=workdir,
                              name=os.path.basename(os.path.abspath(workdir)),
                              config=json.loads(cfg.to_json_best_effort()))

  def write(self, step: int, row: dict) -> None:
    scalars = {k: float(v) for k, v in row.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
    if self.tb is not None:
      for key, value in scalars.items():
        self.tb.add_scalar(key, value, step)
    if self.wandb is not None and scalars:
      self.wandb.log(scalars, step=step)

  def close(self) -> None:
    if self.tb is not None:
      self.tb.close()
    if self.wandb is not None:
      self.wandb.finish()
    self.tb = self.wandb = None  # later rows (the final param_sha256) go to metrics.jsonl only
