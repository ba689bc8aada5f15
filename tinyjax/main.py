"""Entry point: python -m tinyjax.main --config=configs/NAME.py [--config.group.key=value ...] [--workdir=DIR]."""
from __future__ import annotations

from tinyjax.runtime import faults

if __name__ == "__main__":  # before the imports below (~1 s): a stop signal from here on is one line and exit 75
  faults.handle_signals_for_life(grace_s=faults.SETUP_GRACE_S)

import json  # noqa: E402
import os  # noqa: E402

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from tinyjax import cli, config  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/NAME.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (default: workdir/<config name>).")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the planned run as JSON and exit; allocates nothing.")
_HLO_DIR = flags.DEFINE_string("hlo_dir", "", "With --dry_run: also write each compiled step's optimized HLO module "
                               "to DIR/NAME.hlo.txt (NAME: the target, or 'local' for this machine's).")
_TARGET = flags.DEFINE_string("target", "", "With --dry_run: compile for these targets with their own compilers "
                              "(h100, h200, a100-40gb, a100-80gb, 8xh100, v4-8, v5p-32, v5e-8, v6e-8, ...).")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    cli.fail(f"unexpected argument {argv[1]!r}: flags are --config=..., --config.KEY=VALUE, --workdir=..., --dry_run")
  logging.set_verbosity(logging.WARNING)  # absl's INFO lines (e.g. "Unable to initialize backend 'tpu'") are noise
  faults.quiet_background_noise()  # a failed background checkpoint write is main's one line, not Orbax's tracebacks
  cfg = _CONFIG.value
  from tinyjax import env  # imports jax; applying the env must precede any backend use
  workdir = _WORKDIR.value
  try:
    config.validate_platform(cfg.env.platform)  # before JAX loads its plugins (they print lines of their own)
    env_record = env.apply(cfg.env)
    from tinyjax.runtime import distributed  # after the env (XLA reads it at backend start), before any device use
    env_record["distributed"] = distributed.initialize(cfg.distributed)
    env_record["backend"] = env.start_backend(cfg.env)  # what is in force, recorded in run_info.json
    import jax
    config.validate(cfg, num_devices=jax.device_count())
    from tinyjax import plan, sharding, train
    if _DRY_RUN.value or _TARGET.value or _HLO_DIR.value:
      print(json.dumps(plan.dry_run(cfg, sharding.make_mesh(cfg.mesh), env_record, _DRY_RUN.value, _TARGET.value,
                                    _HLO_DIR.value), indent=2))
      return
    if jax.process_index() == 0:
      print(env.summary(env_record), flush=True)
    stem = os.path.splitext(os.path.basename(config_flags.get_config_filename(flags.FLAGS["config"])))[0]
    workdir = _WORKDIR.value or os.path.join("workdir", stem)
    train.run(cfg, workdir, env_record)
    if cfg.train.sample_prompts and jax.process_count() == 1 and not faults.received():  # what the model learned
      from tinyjax import sample  # noqa: PLC0415
      sample.samples_after_training(workdir, prompts=tuple(cfg.train.sample_prompts))
  except Exception as e:  # noqa: BLE001 - the ways a run stops on purpose are one line and an exit code
    cli.stop(e, f"under --workdir={workdir} or config.data.cache_dir={cfg.data.cache_dir}")
    raise  # anything else is a bug: its traceback


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_config_flags)
