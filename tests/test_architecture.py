"""The package's shape: layered imports, no cycles, pure configs, small files.

``docs/architecture.md`` draws the layers; this test keeps the code true to
them. Each checker is also run on a graph that breaks its rule (a checker
that reports nothing would otherwise pass forever).
"""

from __future__ import annotations

import ast
import collections
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "midog_jax"
MAX_LINES = 500

# Bottom to top. A module may import modules of its own layer or below, never
# above. Matched by the longest prefix (module names without "midog_jax.").
LAYERS = (
    # Foundations: types, ids, atomic files, errors, signals, workdir guards,
    # mesh, the MIDOG metric, metric writing, checkpoints, optimisers, configs.
    ("errors", "signals", "workdir", "detections", "fileio", "parallel", "metrics",
     "metric_writer", "checkpoint", "pretrained", "optim", "configs", "config_files"),
    ("data", "models", "candidates"),            # cases, pixels, pure Flax modules
    ("weights",),                                # torchvision weights -> models
    ("detectors", "image_level"),                # one interface, one module each; image-level method
    ("infer", "tta", "evaluate", "curves", "ensemble", "baselines"),  # whole images, scoring
    ("export",),                                 # output formats
    ("evaluation",),                             # evaluating a detector
    ("train", "predict", "classify", "image_level.baseline", "adapt"),  # the loop; new images
    ("mining", "demo", "main", "search", "benchmark"),  # drivers and entry points
)


def module_name(path: Path) -> str:
  parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts = parts[:-1]
  return ".".join(parts)


def import_graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
  """(package module -> package modules it imports, module -> top-level
  names of everything it imports)."""
  files = {module_name(f): f for f in PKG.rglob("*.py")}

  def resolve(name: str) -> str | None:
    while name and name not in files:
      name = name.rpartition(".")[0]
    return name or None

  graph, externals = collections.defaultdict(set), collections.defaultdict(set)
  for mod, f in files.items():
    for node in ast.walk(ast.parse(f.read_text(), str(f))):
      if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
        names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
      else:
        continue
      for n in names:
        externals[mod].add(n.split(".")[0] if not n.startswith("midog_jax") else n)
        target = resolve(n) if n.startswith("midog_jax") else None
        # A package importing its own submodules is not an upward edge.
        if target and target != mod and not target.startswith(mod + "."):
          graph[mod].add(target)
  return {m: graph[m] for m in files}, externals


def layer_of(mod: str) -> int:
  name = mod.removeprefix("midog_jax").lstrip(".")
  best, found = -1, None
  for i, layer in enumerate(LAYERS):
    for prefix in layer:
      if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best:
        best, found = len(prefix), i
  if found is None:
    raise AssertionError(f"{mod} is in no layer of LAYERS: add it (and to the docs)")
  return found


def upward_edges(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
  return sorted((a, b) for a, bs in graph.items() if a != "midog_jax"
                for b in bs if b != "midog_jax" and layer_of(b) > layer_of(a))


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """Every elementary cycle found by depth-first search (one per back edge)."""
  found, state, stack = [], {}, []

  def visit(m):
    state[m] = 1
    stack.append(m)
    for n in sorted(graph.get(m, ())):
      if state.get(n) == 1:
        found.append(stack[stack.index(n):] + [n])
      elif n not in state:
        visit(n)
    stack.pop()
    state[m] = 2

  for m in sorted(graph):
    if m not in state:
      visit(m)
  return found


def test_no_upward_imports_and_no_cycles():
  graph, _ = import_graph()
  assert upward_edges(graph) == []
  assert cycles(graph) == []


def test_the_checkers_catch_a_bad_graph():
  bad = {"midog_jax.infer": {"midog_jax.export"},        # output formats below infer
         "midog_jax.export": {"midog_jax.fileio"},
         "midog_jax.data.a": {"midog_jax.data.b"},
         "midog_jax.data.b": {"midog_jax.data.a"}}
  assert upward_edges(bad) == [("midog_jax.infer", "midog_jax.export")]
  assert cycles(bad) == [["midog_jax.data.a", "midog_jax.data.b", "midog_jax.data.a"]]
  with pytest.raises(AssertionError, match="in no layer"):
    layer_of("midog_jax.somewhere_new")


def test_configs_import_only_ml_collections_and_common():
  _, externals = import_graph()
  for mod, names in externals.items():
    if mod.startswith("midog_jax.configs."):
      # "configs" is configs/common.py, imported by its own name.
      assert names <= {"__future__", "ml_collections", "configs"}, (mod, names)


def test_inference_and_scoring_do_not_import_output_formats():
  graph, _ = import_graph()
  for mod in ("midog_jax.infer", "midog_jax.evaluate"):
    assert "midog_jax.export" not in graph[mod]


def test_no_module_over_500_lines():
  # The same list: wc -l $(git ls-files 'midog_jax/*.py') | awk '$1 > 500'
  long = {str(f.relative_to(PKG.parent)): n for f in PKG.rglob("*.py")
          if (n := len(f.read_text().splitlines())) > MAX_LINES}
  assert long == {}


def test_optional_detector_members_are_reached_only_through_the_declared_hooks():
  # detectors/interface.HOOKS lists every optional member; code outside the
  # detectors asks for them with interface.hook, never by probing attributes.
  from midog_jax.detectors import interface
  offenders = []
  for f in PKG.rglob("*.py"):
    if "detectors" in f.relative_to(PKG).parts:
      continue
    for node in ast.walk(ast.parse(f.read_text(), str(f))):
      if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
          and node.func.id in ("hasattr", "getattr") and len(node.args) >= 2
          and isinstance(node.args[1], ast.Constant) and node.args[1].value in interface.HOOKS):
        offenders.append(f"{f.relative_to(PKG)}:{node.lineno}")
  assert offenders == []
  with pytest.raises(KeyError, match="not a declared detector hook"):
    interface.hook(object(), "fitt")
