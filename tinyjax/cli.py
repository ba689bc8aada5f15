"""Command-line plumbing shared by the tinyjax programs: a user mistake is one line on stderr and exit code 2."""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys

from absl import flags

from tinyjax import errors


def summary(doc: str) -> str:
  """A module docstring's first paragraph as one line: a program's --help description (its first line alone can
  stop mid-sentence)."""
  return " ".join(doc.strip().split("\n\n")[0].split())


def fail(message: str) -> None:
  print(f"tinyjax: error: {message}", file=sys.stderr)
  sys.exit(errors.EXIT_USAGE)


def _leave(message: str, code: int) -> None:
  """Prints and exits at once: pending background work (Orbax's failed writes) would only add tracebacks at
  interpreter exit."""
  print(message, file=sys.stderr)
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)


def stop(e: Exception, where: str) -> None:
  """Exits as errors.ending declares for the ways a run stops on purpose (one line and its exit code); returns for
  anything else (a bug: the caller re-raises it)."""
  from tinyjax.runtime import distributed, faults  # noqa: PLC0415 - only the programs that train need them
  end = errors.ending(e, where)
  if end is None:
    return
  if end.code == errors.EXIT_LOST_HOST:
    distributed.leave_lost_host(end.evidence)
  if end.now:
    _leave(end.line, end.code)
  faults.tell_once(end.line)
  sys.exit(end.code)


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


def load_config(main_args: list[str]):
  """The config `python -m tinyjax.main MAIN_ARGS` would run (its file and --config.* overrides), loaded the same
  way, with the same one-line errors; for the launchers' preflight."""
  from ml_collections import config_flags  # noqa: PLC0415
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  on_worker = lambda path: path if os.path.exists(path) else os.path.join(repo, path)  # the checkout's copy
  argv = ["tinyjax.main", *(f"--config={on_worker(a.split('=', 1)[1])}" if a.startswith("--config=") else a
                            for a in main_args if a.startswith("--config"))]
  values = flags.FlagValues()  # overrides are read from sys_argv (default: the launcher's own sys.argv)
  config_flags.DEFINE_config_file("config", None, "Config file.", flag_values=values, lock_config=True, sys_argv=argv)
  parse_config_flags(argv, values)
  return values.config


HELP = {"--help", "-h", "-?", "--helpshort", "--helpfull"}


def parse_config_flags(argv: list[str], values: flags.FlagValues | None = None) -> list[str]:
  """absl `flags_parser` for programs with an ml_collections --config flag: one-line errors, exit code 2."""
  path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if path is None and HELP.intersection(argv):  # absl's own --help exits 1; help asked for is a success
    from absl import app  # noqa: PLC0415
    app.usage(shorthelp="--helpfull" not in argv, writeto_stdout=True, exitcode=0)
  if path is None:
    fail("--config=configs/NAME.py is required")
  if not os.path.isfile(path):
    fail(f"--config={path}: no such config file (see configs/)")
  _load_config_file(path)
  try:
    return (values or flags.FLAGS)(argv)
  except (AttributeError, KeyError):
    fail(f"unknown config key {', '.join(_unknown_keys(argv)) or '?'} (every key is declared in tinyjax/config.py)")
  except (flags.Error, TypeError, ValueError) as e:
    fail(str(e).strip().splitlines()[-1])
