"""Entry point: python -m tinyjax.main --config=configs/NAME.py [--config.group.key=value ...] [--workdir=DIR]."""
from __future__ import annotations

import importlib.util
import json
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from tinyjax import config, faults

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/NAME.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (default: workdir/<config name>).")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the planned run as JSON and exit; allocates nothing.")


def _fail(message: str) -> None:
  print(f"tinyjax: error: {message}", file=sys.stderr)
  sys.exit(2)


def _unknown_keys(argv: list[str]) -> list[str]:
  """The --config.a.b overrides that name no key of the config file (found by loading it again, unlocked)."""
  path = next(a.split("=", 1)[1] for a in argv if a.startswith("--config="))
  spec = importlib.util.spec_from_file_location("_tinyjax_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg, bad = module.get_config(), []
  for arg in argv:
    if arg.startswith("--config."):
      node = cfg
      for part in arg[len("--config."):].split("=", 1)[0].split("."):
        if not hasattr(node, "keys") or part not in node:
          bad.append(arg[2:].split("=", 1)[0])
          break
        node = node[part]
  return bad


def _parse(argv: list[str]) -> list[str]:
  """absl parsing, but a bad flag or config override is one line on stderr and exit code 2, not a traceback."""
  path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if path is None:
    _fail("--config=configs/NAME.py is required")
  if not os.path.isfile(path):
    _fail(f"--config={path}: no such config file (see configs/)")
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError):
    _fail(f"unknown config key {', '.join(_unknown_keys(argv)) or '?'} (every key is declared in tinyjax/config.py)")
  except (flags.Error, TypeError, ValueError) as e:
    _fail(str(e).strip().splitlines()[-1])


def main(argv: list[str]) -> None:
  del argv
  logging.set_verbosity(logging.WARNING)  # absl's INFO lines (e.g. "Unable to initialize backend 'tpu'") are noise
  cfg = _CONFIG.value
  from tinyjax import env  # imports jax; applying the env must precede any backend use
  try:
    env_record = env.apply(cfg.env)
    import jax
    config.validate(cfg, num_devices=jax.device_count())
    from tinyjax import plan, sharding, train
    if _DRY_RUN.value:
      print(json.dumps(plan.describe(cfg, sharding.make_mesh(cfg.mesh), env_record), indent=2))
      return
    print(env.summary(env_record), flush=True)
    stem = os.path.splitext(os.path.basename(config_flags.get_config_filename(flags.FLAGS["config"])))[0]
    train.run(cfg, _WORKDIR.value or os.path.join("workdir", stem), env_record)
  except config.ConfigError as e:
    _fail(str(e))
  except faults.Preempted as e:
    print(f"tinyjax: {e}", file=sys.stderr)
    sys.exit(faults.EXIT_PREEMPTED)
  except faults.Diverged as e:
    print(f"tinyjax: diverged: {e}", file=sys.stderr)
    sys.exit(faults.EXIT_DIVERGED)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse)
