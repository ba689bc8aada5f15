"""The package's shape (BUILD_NOTES "Layout"): no import circle, the lower layers never import the trainer or a command,
no function over 60 lines except the declaration table. Read from the source with `ast`; nothing is imported."""
import ast
import os

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tinyjax")
LOWER = ("tinyjax.data", "tinyjax.runtime", "tinyjax.hardware.memory", "tinyjax.hardware.targets",
         "tinyjax.hardware.roofline")
UPPER = ("tinyjax.train", "tinyjax.step", "tinyjax.main", "tinyjax.plan", "tinyjax.evaluate", "tinyjax.compare",
         "tinyjax.plot", "tinyjax.sweep", "tinyjax.stability", "tinyjax.envdiff", "tinyjax.export", "tinyjax.sample")
DECLARATION_TABLES = {"tinyjax.config.base"}


def modules() -> dict[str, ast.Module]:
  found = {}
  for folder, _, files in os.walk(PACKAGE):
    for file in files:
      if file.endswith(".py"):
        path = os.path.join(folder, file)
        name = "tinyjax." + os.path.relpath(path, PACKAGE)[:-3].replace(os.sep, ".")
        with open(path, encoding="utf-8") as f:
          found[name.removesuffix(".__init__")] = ast.parse(f.read())
  return found


def imports(name: str, tree: ast.Module, known) -> set[str]:
  """The package modules `name` imports anywhere in its body (`from tinyjax.x import y` counts y when y is a module)."""
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tinyjax"):
      out |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module for a in node.names}
    elif isinstance(node, ast.Import):
      out |= {a.name for a in node.names if a.name.startswith("tinyjax")}
  return {m for m in out if m in known and m != name and not name.startswith(m + ".")}  # a package's own __init__


@pytest.fixture(scope="module")
def graph():
  mods = modules()
  return {name: imports(name, tree, mods) for name, tree in mods.items()}


def test_no_import_circle(graph):
  state, stack = {}, []  # 1: on the current path, 2: done

  def visit(node):
    state[node] = 1
    stack.append(node)
    for dep in sorted(graph[node]):
      assert state.get(dep) != 1, "import circle: " + " -> ".join(stack[stack.index(dep):] + [dep])
      if dep not in state:
        visit(dep)
    stack.pop()
    state[node] = 2
  for name in sorted(graph):
    if name not in state:
      visit(name)
  assert len(state) == len(graph) > 40


def test_lower_layers_never_import_the_trainer_or_a_command(graph):
  lower = [m for m in graph if m.startswith(LOWER)]
  assert len(lower) >= 15
  assert {m: sorted(d for d in deps if d.startswith(UPPER)) for m, deps in graph.items()
          if m in lower and any(d.startswith(UPPER) for d in deps)} == {}
  assert graph["tinyjax.plan"] >= {"tinyjax.step"} and graph["tinyjax.train"] >= {"tinyjax.step"}
  assert "tinyjax.plan" not in graph["tinyjax.step"] and "tinyjax.train" not in graph["tinyjax.step"]


def test_no_function_over_sixty_lines():
  long = {}
  for name, tree in modules().items():
    for node in ast.walk(tree):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        length = node.end_lineno - node.lineno + 1
        if length > 60 and f"{name}.{node.name}" not in DECLARATION_TABLES:
          long[f"{name}.{node.name}"] = length
  assert long == {}
