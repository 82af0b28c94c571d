"""Imports flow one way through `codistill_jax/` (DESIGN.md, "Which way
imports flow"), checked by parsing every module with `ast`.

Every import counts, at the top of a module or inside a function: a lazy
import is still a dependency. The layers, bottom first, are `LAYERS` below;
a module may import its own layer (the graph must stay acyclic) and the
layers beneath it, never one above. A new module must be given a layer here
and on docs/architecture.md, or this test fails.
"""

import ast
import os

import pytest

from tests.test_train import ROOT

PACKAGE = "codistill_jax"

# Bottom first. A name covers a module or a whole subpackage.
LAYERS = (
    ("codistill_jax", "errors", "paths", "cadence", "perf"),
    ("config_lib", "plugins"),
    # The pure core and the plug-ins.
    ("losses", "sampling", "distill", "step", "averaging", "noise_scale",
     "optim", "mesh", "metrics", "evaluation", "models", "data"),
    ("checkpoint",),
    ("exchange",),
    ("storage",),
    ("build",),
    # Optional extras of the teacher sources (Ray; the stored targets).
    ("service", "target_store"),
    ("teachers",),
    ("validate",),
    ("train",),
    # Entry points: the trainer's and the other commands'.
    ("main", "cli", "tools"),
)
# Imported only inside a function below `tools/`: optional extras whose
# dependencies a plain install does not have.
LAZY_ONLY = ("service",)
# Top-level packages of this repository that the library never imports.
OUTSIDE = ("configs", "experiments", "tests")


def module_name(path: str) -> str:
  rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
  return rel.removesuffix(".__init__")


def sources(root: str = ROOT) -> dict[str, str]:
  """{dotted module name: its source} of every module of the package."""
  out = {}
  for dirpath, _, files in os.walk(os.path.join(root, PACKAGE)):
    for f in files:
      if f.endswith(".py"):
        path = os.path.join(dirpath, f)
        with open(path) as fh:
          out[module_name(path)] = fh.read()
  return out


def imports(name: str, source: str, modules: set[str]) -> list[tuple]:
  """[(imported module, line, inside a function)] of one module.

  `from a import b` counts as importing `a.b` when that is a module (and
  `a` too, whose __init__ Python runs first, unless `a` is the top
  package), else `a`. Relative imports are resolved against `name`.
  """
  is_package = f"{name}.__init__" in modules or any(
      m.startswith(name + ".") for m in modules)
  out = []

  def visit(node, in_function):
    for child in ast.iter_child_nodes(node):
      nested = in_function or isinstance(
          child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
      if isinstance(child, ast.Import):
        for alias in child.names:
          out.append((alias.name, child.lineno, in_function))
      elif isinstance(child, ast.ImportFrom):
        base = child.module or ""
        if child.level:
          parts = name.split(".")
          parts = parts if is_package else parts[:-1]
          parts = parts[:len(parts) - (child.level - 1)]
          base = ".".join(parts + ([child.module] if child.module else []))
        for alias in child.names:
          full = f"{base}.{alias.name}"
          if full in modules and base != PACKAGE:
            # `from pkg import mod` runs pkg/__init__ too: an edge to both.
            out.append((base, child.lineno, in_function))
          out.append((full if full in modules else base, child.lineno,
                      in_function))
      visit(child, nested)

  visit(ast.parse(source), False)
  return out


def layer_of(name: str) -> int | None:
  """The layer of a dotted module name (its longest listed prefix)."""
  rel = name.removeprefix(PACKAGE + ".") if name != PACKAGE else PACKAGE
  best = None
  for i, layer in enumerate(LAYERS):
    for entry in layer:
      if rel == entry or rel.startswith(entry + "."):
        if best is None or len(entry) > best[1]:
          best = (i, len(entry))
  return None if best is None else best[0]


def _unit(name: str) -> str:
  """The LAYERS entry a module belongs to ('data' for data.flights)."""
  rel = name.removeprefix(PACKAGE + ".")
  return max((e for layer in LAYERS for e in layer
              if rel == e or rel.startswith(e + ".")), key=len, default=rel)


def problems(srcs: dict[str, str]) -> list[str]:
  """Every broken rule of the import graph of `srcs`, as a sentence."""
  modules = set(srcs)
  out, graph = [], {m: set() for m in modules}
  for name, source in sorted(srcs.items()):
    mine = layer_of(name)
    if mine is None:
      out.append(f"{name} has no layer: add it to tests/test_layering.py's "
                 "LAYERS and to docs/architecture.md")
      continue
    for target, line, lazy in imports(name, source, modules):
      root = target.split(".")[0]
      if root in OUTSIDE:
        out.append(f"{name}:{line} imports {target}: the library never "
                   f"imports {', '.join(OUTSIDE)}")
        continue
      if root != PACKAGE or target == name:
        continue
      if target not in modules:  # A name imported from a module.
        target = target.rsplit(".", 1)[0]
      graph[name].add(target)
      theirs = layer_of(target)
      if theirs is not None and theirs > mine:
        out.append(f"{name}:{line} imports {target} from a layer above "
                   f"({_unit(target)} is above {_unit(name)})")
      if (_unit(target) in LAZY_ONLY and not lazy and
          _unit(name) != _unit(target) and _unit(name) != "tools"):
        out.append(f"{name}:{line} imports {target} at module level: it is "
                   "an optional extra, import it inside the function")
  out += [f"import cycle: {' -> '.join(c)}" for c in cycles(graph)]
  return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """One cycle through each strongly connected component of > 1 module
  (Tarjan's algorithm; iterative-free, the graph is small)."""
  index, low, stack, on_stack, out = {}, {}, [], set(), []

  def strong(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph.get(v, ())):
      if w not in index:
        strong(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        out.append(_a_cycle(sorted(component), graph))

  for v in sorted(graph):
    if v not in index:
      strong(v)
  return out


def _a_cycle(component: list[str], graph) -> list[str]:
  """A path from the component's first module back to itself."""
  members, start = set(component), component[0]
  paths = {start: [start]}
  queue = [start]
  while queue:
    v = queue.pop(0)
    for w in sorted(graph[v] & members):
      if w == start:
        return paths[v] + [start]
      if w not in paths:
        paths[w] = paths[v] + [w]
        queue.append(w)
  return component


# ----------------------------------------------------------------------------
# The package as it is.
# ----------------------------------------------------------------------------
def test_imports_flow_one_way():
  found = problems(sources())
  assert not found, "\n".join(found)


def test_every_module_has_a_layer_and_the_layers_are_the_design():
  names = sources()
  assert all(layer_of(n) is not None for n in names)
  # Each LAYERS entry exists, so a rename cannot leave a stale rule behind.
  for layer in LAYERS:
    for entry in layer:
      full = PACKAGE if entry == PACKAGE else f"{PACKAGE}.{entry}"
      assert full in names, f"LAYERS names {entry}, which does not exist"
  # The architecture page names every layer's entries.
  with open(os.path.join(ROOT, "docs", "architecture.md")) as f:
    text = f.read()
  for layer in LAYERS[1:]:
    for entry in layer:
      assert f"`{entry}" in text or f"{entry}/" in text, (
          f"docs/architecture.md does not name {entry}")


# ----------------------------------------------------------------------------
# The checker itself: planted violations are found.
# ----------------------------------------------------------------------------
def _planted(**extra) -> dict[str, str]:
  srcs = sources()
  for name, code in extra.items():
    name = f"{PACKAGE}.{name.replace('__', '.')}"
    srcs[name] = srcs.get(name, "") + "\n" + code
  return srcs


@pytest.mark.parametrize("module,code,expected", [
    # The pure core reaching up to storage, inside a function.
    ("losses", "def f():\n  from codistill_jax import storage\n",
     "imports codistill_jax.storage from a layer above (storage is above "
     "losses)"),
    # A library module importing a command.
    ("train", "from codistill_jax.tools import plot\n",
     "imports codistill_jax.tools.plot from a layer above"),
    # Only main and the tools import the trainer.
    ("teachers", "import codistill_jax.train\n",
     "imports codistill_jax.train from a layer above"),
    # config_lib imports nothing of the package but errors.
    ("config_lib", "def f():\n  from codistill_jax import models\n",
     "imports codistill_jax.models from a layer above"),
    # Configs and experiments are never imported by the library.
    ("build", "from configs import lm\n", "the library never imports"),
    # An optional extra at module level.
    ("teachers", "from codistill_jax import service\n",
     "at module level: it is an optional extra"),
    # A module nobody placed.
    ("newthing", "x = 1\n", "codistill_jax.newthing has no layer"),
])
def test_the_checker_finds_a_planted_violation(module, code, expected):
  found = problems(_planted(**{module: code}))
  assert any(expected in p for p in found), found


def test_the_checker_finds_a_cycle_within_a_layer():
  # distill imports losses; losses importing distill closes a loop.
  found = problems(_planted(losses="from codistill_jax import distill\n"))
  assert any(p.startswith("import cycle:") and "codistill_jax.losses" in p
             and "codistill_jax.distill" in p for p in found), found


def test_relative_imports_resolve():
  srcs = {"codistill_jax.data": "from . import flights\n",
          "codistill_jax.data.flights": "from .. import errors\n",
          "codistill_jax.errors": ""}
  got = {m: [t for t, _, _ in imports(m, s, set(srcs))]
         for m, s in srcs.items()}
  assert got["codistill_jax.data"] == ["codistill_jax.data",
                                       "codistill_jax.data.flights"]
  assert got["codistill_jax.data.flights"] == ["codistill_jax.errors"]


def test_a_package_whose_init_imports_a_module_that_imports_it_is_a_cycle():
  """pkg/__init__ imports pkg.a, which imports a sibling through pkg: Python
  runs pkg/__init__ for that, so pkg and pkg.a import each other."""
  srcs = {"codistill_jax.service": "from codistill_jax.service import a\n",
          "codistill_jax.service.a": "from codistill_jax.service import b\n",
          "codistill_jax.service.b": ""}
  assert any(p.startswith("import cycle:") for p in problems(srcs))
