"""Every `python -m tinyjax.NAME` the README names answers --help with its usage and exit 0 (absl's own --help
exits 1; the entry point and the data command need no --config to say how they are used)."""
import os
import re

import pytest
import support

README = os.path.join(support.ROOT, "README.md")


def _commands() -> list[str]:
  with open(README, encoding="utf-8") as f:
    return sorted(set(re.findall(r"python -m (tinyjax(?:\.[a-z_]+)+)", f.read())))


def test_the_readme_names_the_commands():
  assert {"tinyjax.main", "tinyjax.data", "tinyjax.benchmarks.device", "tinyjax.benchmarks.roofline"} <= \
      set(_commands())


@pytest.mark.slow
@pytest.mark.parametrize("module", _commands())
def test_help_exits_0(module):
  r = support.run_program("--help", module=module, timeout=120)
  assert r.returncode == 0, r.stderr[-2000:]
  assert "usage" in r.stdout.lower() or "--" in r.stdout, r.stdout[:2000]
