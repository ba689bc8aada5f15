"""python -m tinyjax.data --config=configs/NAME.py: prepares the data a config names (tokenizer, train and eval caches)
ahead of a run, and prints what they hold."""

from __future__ import annotations

import sys

from absl import app, flags

from tinyjax import cli, config, errors
from tinyjax.errors import ConfigError
from tinyjax.data import cache
from tinyjax.data.loader import TRAIN_SPLIT, prepare
from tinyjax.runtime import faults


def main(argv) -> None:
  """python -m tinyjax.data --config=...: build or resume the caches the config names, then print what they hold."""
  del argv
  cfg = flags.FLAGS.config
  faults.quiet_background_noise()  # e.g. the resource tracker's warnings after workers ended abruptly
  try:
    config.validate(cfg)
    ds = prepare(cfg)
  except (ConfigError, errors.Preempted) as e:  # a mistake: exit 2; a stop signal: exit 75 (the build resumes)
    cli.stop(e, f"config.data.cache_dir={cfg.data.cache_dir}")
    raise
  print(f"tokenizer: {cfg.data.tokenizer} -> {ds.tokenizer_path} ({ds.tokenizer_vocab_size:,} ids, bos {ds.bos_id}, "
        f"eos {ds.eos_id})")
  for name, path in [(TRAIN_SPLIT, ds.train_cache), *sorted(ds.eval_caches.items())]:
    windows = cache.TokenCache(path).num_tokens // cfg.model.seq_len
    print(f"{name}: {cache.summary(path)}; {windows:,} windows of {cfg.model.seq_len} -> {path}")
  sys.stdout.flush()


if __name__ == "__main__":
  from ml_collections import config_flags  # noqa: PLC0415  (the flag exists only when this runs as a program)
  config_flags.DEFINE_config_file("config", None, "Config file (configs/NAME.py).", lock_config=True)
  faults.handle_signals_for_life("while building the data caches; rerun to resume the build", faults.SETUP_GRACE_S)
  app.run(main, flags_parser=cli.parse_config_flags)
