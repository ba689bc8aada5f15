"""Mirrors of metrics.jsonl and dynamics.jsonl for experiment trackers: TensorBoard event files in
workdir/tensorboard (tensorboardX: no TensorFlow needed) and, optionally, Weights & Biases (train.wandb_project;
`pip install tinyjax[wandb]`). Process 0 only. The JSONL files stay the record; trackers are views of them.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import socket
import time

import jax

from tinyjax.errors import ConfigError

TB_DIR = "tensorboard"
TB_FLUSH_S = 120.0  # between flushes of the event file (tensorboardX's default flush_secs)


class EventFile:
  """TensorBoard scalars written by the calling thread (tensorboardX's RecordWriter and summary protos).

  Not tensorboardX's SummaryWriter: it writes from a thread of its own, which died on a full disk (ENOSPC in a flush)
  and left the training loop blocked for good on its full queue (measured: minutes in a futex wait, a first SIGTERM
  acknowledged and ignored). Here a failed write raises in the loop, where a full disk is one line and exit 2; the
  cost is a few small protobuf writes per logged step into a buffered file.
  """

  def __init__(self, logdir: str, purge_step: int | None):
    from tensorboardX.proto.event_pb2 import Event, SessionLog  # noqa: PLC0415
    from tensorboardX.record_writer import RecordWriter  # noqa: PLC0415
    os.makedirs(logdir, exist_ok=True)
    # TensorBoard's file name pattern, plus the pid: a run resumed within the same second must not overwrite it
    name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
    self.records, self.flushed, self.broken = RecordWriter(os.path.join(logdir, name)), time.monotonic(), False
    self._write(Event(wall_time=time.time(), file_version="brain.Event:2"))
    if purge_step is not None:  # a resumed run rewrites the steps from purge_step on: TensorBoard drops the old copies
      self._write(Event(wall_time=time.time(), step=purge_step, session_log=SessionLog(status=SessionLog.START)))

  def _write(self, event) -> None:
    try:
      self.records.write(event.SerializeToString())
    except OSError:
      self.broken = True
      raise

  def scalars(self, step: int, values: dict[str, float]) -> None:
    from tensorboardX.proto.event_pb2 import Event  # noqa: PLC0415
    from tensorboardX.summary import scalar  # noqa: PLC0415
    for key, value in values.items():
      self._write(Event(wall_time=time.time(), step=step, summary=scalar(key, value)))
    if time.monotonic() - self.flushed >= TB_FLUSH_S:
      self.flushed = time.monotonic()
      self.flush()

  def flush(self) -> None:
    try:
      self.records.flush()
    except OSError:
      self.broken = True
      raise

  def close(self) -> None:
    """Flushes and closes. After a failed write it only closes (dropping what is buffered): the run is already
    stopping on that error."""
    try:
      if not self.broken:
        self.flush()
    finally:
      with contextlib.suppress(OSError):  # a failed flush inside close() still closes the file
        self.records.close()


class Tracker:

  def __init__(self, workdir: str, cfg, start_step: int):
    self.tb = self.wandb = None
    if jax.process_index() != 0:
      return
    if cfg.train.tensorboard:
      self.tb = EventFile(os.path.join(workdir, TB_DIR), purge_step=start_step + 1 if start_step else None)
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
      self.tb.scalars(step, scalars)
    if self.wandb is not None and scalars:
      self.wandb.log(scalars, step=step)

  def close(self) -> None:
    tb, wandb, self.tb, self.wandb = self.tb, self.wandb, None, None  # later rows (the final param_sha256): JSONL
    try:
      if tb is not None:
        tb.close()
    finally:
      if wandb is not None:
        wandb.finish()
