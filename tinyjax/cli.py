"""Command-line plumbing shared by the tinyjax programs: a user mistake is one line on stderr and exit code 2."""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys

from absl import flags


def fail(message: str) -> None:
  print(f"tinyjax: error: {message}", file=sys.stderr)
  sys.exit(2)


def _leave(message: str, code: int) -> None:
  """Prints and exits at once: pending background work (Orbax's failed writes) would only add tracebacks at
  interpreter exit."""
  print(message, file=sys.stderr)
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)


def stop(e: Exception, where: str) -> None:
  """Exits for the ways a training run stops on purpose: a user mistake or a full disk (one line, exit 2), a
  stop signal (75) or a divergence (3). Returns for anything else (a bug: the caller re-raises it)."""
  from tinyjax import config, faults  # noqa: PLC0415 - only the trainer's entry point needs them
  if isinstance(e, config.ConfigError):
    fail(str(e))
  full = faults.in_chain(e, faults.DiskFull)  # e.g. a failed save, then run_info.json's write failing too
  if full is not None:
    _leave(f"tinyjax: error: {full}", 2)
  if isinstance(e, faults.StoppedInSetup):  # raised at a safe point: an ordinary exit (build workers joined, ...)
    faults.tell_once(f"tinyjax: {e}")
    sys.exit(faults.EXIT_PREEMPTED)
  if isinstance(e, faults.Preempted):
    print(f"tinyjax: {e}", file=sys.stderr)
    sys.exit(faults.EXIT_PREEMPTED)
  if isinstance(e, faults.Diverged):
    print(f"tinyjax: diverged: {e}", file=sys.stderr)
    sys.exit(faults.EXIT_DIVERGED)
  reason = faults.disk_full_reason(e)  # a full disk anywhere else: metrics, records, caches
  if reason:
    _leave(f"tinyjax: error: disk full ({reason}) writing {getattr(e, 'filename', None) or where}: free space and "
           "rerun (it resumes from the last checkpoint)", 2)


class ArgParser(argparse.ArgumentParser):
  """argparse whose usage errors are tinyjax's one-line errors."""

  def error(self, message):
    fail(message)


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


def _load_config_file(path: str) -> None:
  """Runs the config file's get_config() once so a broken file is one line (absl would print a traceback)."""
  try:
    spec = importlib.util.spec_from_file_location("_tinyjax_config_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
  except Exception as e:  # noqa: BLE001 - any error in the user's file (SyntaxError, ImportError, ...) is theirs
    first = (str(e).strip().splitlines() or [""])[0]
    fail(f"--config={path}: the file cannot be loaded ({type(e).__name__}: {first})")
  if not callable(getattr(module, "get_config", None)):
    fail(f"--config={path}: the file defines no get_config() (see configs/tiny.py)")
  try:
    module.get_config()
  except Exception as e:  # noqa: BLE001
    fail(f"--config={path}: get_config() raised {type(e).__name__}: {str(e).strip()[:200]}")


def parse_config_flags(argv: list[str]) -> list[str]:
  """absl `flags_parser` for programs with an ml_collections --config flag: one-line errors, exit code 2."""
  path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if path is None:
    fail("--config=configs/NAME.py is required")
  if not os.path.isfile(path):
    fail(f"--config={path}: no such config file (see configs/)")
  _load_config_file(path)
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError):
    fail(f"unknown config key {', '.join(_unknown_keys(argv)) or '?'} (every key is declared in tinyjax/config.py)")
  except (flags.Error, TypeError, ValueError) as e:
    fail(str(e).strip().splitlines()[-1])
