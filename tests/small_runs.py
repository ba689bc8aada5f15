"""Test helper: a small, fast training config and an in-process run that can be preempted at a chosen step."""
import os
import signal

from tinyjax import config, data, env, train


def small_cfg(cache_dir, **overrides):
  """d 32, 2 layers, seq 32, vocab 512, batch 8, 8 steps, checkpoints every 4; overrides as "group.key": value."""
  c = config.base()
  m = c.model
  m.hidden_dim, m.intermediate_dim, m.num_layers, m.num_heads, m.num_kv_heads = 32, 64, 2, 2, 2
  m.seq_len, m.vocab_size = 32, 512
  t = c.train
  t.train_batch_size, t.num_train_steps, t.log_every, t.steps_per_eval, t.max_eval_batches = 8, 8, 1, 4, 1
  c.checkpoint.save_interval_steps, c.checkpoint.max_to_keep = 4, 3
  c.data.cache_dir, c.mesh.data = cache_dir, 1
  for key, value in overrides.items():
    group, name = key.split(".")
    c[group][name] = value
  return c


def run(cfg, workdir: str, sigterm_at: int | None = None, sig: int = signal.SIGTERM):
  """train.run in this process; with sigterm_at, a SIGTERM (or `sig`) lands during that step (a preemption notice)."""
  real = data.train_batches

  def batches(ds, cfg, start_step=0, *args):
    for step, rows in enumerate(real(ds, cfg, start_step, *args), start=start_step + 1):
      if step == sigterm_at:
        os.kill(os.getpid(), sig)  # handled between bytecodes: lands during this step
      yield rows
  data.train_batches = batches
  try:
    return train.run(cfg, str(workdir), env.record())
  finally:
    data.train_batches = real
