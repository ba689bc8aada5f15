"""The package's shape (BUILD_NOTES "Layout"): every module sits in one layer and imports only its own layer and those
below (function-local imports included), no import circle, no function over 60 lines except the declaration table.
Read from the source with `ast`; nothing is imported."""
import ast
import fnmatch
import os

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tinyjax")
# Lowest first. A module's layer is the one naming it exactly, else the first whose pattern matches it.
LAYERS = (
    ("leaves: import nothing of tinyjax", (
        "tinyjax.errors", "tinyjax.reference", "tinyjax.kernels", "tinyjax.kernels.*", "tinyjax.sharding",
        "tinyjax.runtime.files", "tinyjax.launch.commands", "tinyjax.hardware", "tinyjax.hardware.hlo",
        "tinyjax.launch", "tinyjax.runtime", "tinyjax.benchmarks")),
    ("the model", ("tinyjax.model", "tinyjax.flops", "tinyjax.hardware.roofline")),
    ("config and the targets' facts", ("tinyjax.config", "tinyjax.optim", "tinyjax.hardware.targets",
                                       "tinyjax.hardware.memory")),
    ("services: runtime, data, environment", ("tinyjax.runtime.*", "tinyjax.data", "tinyjax.data.builder",
                                              "tinyjax.data.cache", "tinyjax.data.corpus", "tinyjax.data.loader",
                                              "tinyjax.data.tokenizer", "tinyjax.env", "tinyjax.dynamics")),
    ("the step and its peers", ("tinyjax.step", "tinyjax.cli", "tinyjax.weights", "tinyjax.evaluate")),
    ("planning", ("tinyjax.audit", "tinyjax.aot", "tinyjax.plan")),
    ("the trainer", ("tinyjax.train",)),
    ("commands", ("tinyjax", "tinyjax.main", "tinyjax.compare", "tinyjax.plot", "tinyjax.sweep", "tinyjax.stability",
                  "tinyjax.envdiff", "tinyjax.export", "tinyjax.sample", "tinyjax.launch.tpu", "tinyjax.launch.slurm",
                  "tinyjax.data.__main__", "tinyjax.benchmarks.*")),
)
DECLARATION_TABLES = {"tinyjax.config.base"}


def layer(module: str) -> int | None:
  exact = [i for i, (_, names) in enumerate(LAYERS) if module in names]
  matched = [i for i, (_, names) in enumerate(LAYERS) if any(fnmatch.fnmatchcase(module, n) for n in names)]
  return (exact or matched or [None])[0]


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


def test_every_module_has_a_layer_and_imports_nothing_above_it(graph):
  assert {m for m in graph if layer(m) is None} == set(), "a new module needs its layer in LAYERS"
  upward = {f"{m} ({LAYERS[layer(m)][0]}) -> {d} ({LAYERS[layer(d)][0]})"
            for m, deps in graph.items() for d in deps if layer(d) > layer(m)}
  assert upward == set()
  assert not [m for m in graph if m.startswith("tinyjax.hardware.") and layer(m) > 2], "hardware/ holds facts only"
  assert graph["tinyjax.plan"] >= {"tinyjax.step"} and graph["tinyjax.train"] >= {"tinyjax.step"}


def test_no_function_over_sixty_lines():
  long = {}
  for name, tree in modules().items():
    for node in ast.walk(tree):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        length = node.end_lineno - node.lineno + 1
        if length > 60 and f"{name}.{node.name}" not in DECLARATION_TABLES:
          long[f"{name}.{node.name}"] = length
  assert long == {}
