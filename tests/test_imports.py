"""The import graph: `surrogate` (the simulator) never imports `calibrate` (real runs in,
answers out), and no module imports itself through others.

Every import counts, function-local ones included: a lazy import that closes a circle is a
circle all the same.
"""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("surrogate", "calibrate")


def _modules() -> dict[str, pathlib.Path]:
  out = {}
  for pkg in PACKAGES:
    for path in (ROOT / pkg).rglob("*.py"):
      parts = path.relative_to(ROOT).with_suffix("").parts
      name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
      out[name] = path
  return out


def _imports(path: pathlib.Path, name: str, known: set[str]) -> set[str]:
  """The project modules `name` imports (a `from pkg import sub` counts as pkg.sub)."""
  is_pkg = path.name == "__init__.py"
  found = set()
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      found.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:  # relative: resolve against this module's package
        pkg = name.split(".") if is_pkg else name.split(".")[:-1]
        pkg = pkg[:len(pkg) - node.level + 1]
        base = ".".join(pkg + ([base] if base else []))
      for a in node.names:
        sub = f"{base}.{a.name}"
        found.add(sub if sub in known else base)
  return {m for m in found if m in known and m != name}


def _graph() -> dict[str, set[str]]:
  mods = _modules()
  return {name: _imports(path, name, set(mods)) for name, path in mods.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """Strongly connected components with more than one module (Tarjan)."""
  index, low, stack, on, out = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on.add(v)
    for w in sorted(graph[v]):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        out.append(sorted(comp))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


def test_the_graph_sees_the_packages():
  graph = _graph()
  assert {"surrogate.simulate", "calibrate.cli.main", "calibrate.io.runlog"} <= set(graph)
  assert "surrogate.simulate" in graph["calibrate.fitting.fit"]  # the parser finds edges


def test_surrogate_imports_nothing_from_calibrate():
  bad = {m: sorted(d for d in deps if d.split(".")[0] == "calibrate")
         for m, deps in _graph().items() if m.split(".")[0] == "surrogate"}
  assert {m: d for m, d in bad.items() if d} == {}


def test_no_import_cycles():
  assert _cycles(_graph()) == []


def test_the_cycle_finder_finds_cycles():
  assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
  assert _cycles({"a": {"b"}, "b": set()}) == []


# The pipeline's rooms, lowest first: a room imports only from rooms below it (or itself).
LAYERS = ("surrogate", "calibrate.io", "calibrate.fitting", "calibrate.answers", "calibrate.cli")


def _layer(module: str) -> int | None:
  for i, prefix in reversed(list(enumerate(LAYERS))):
    if module == prefix or module.startswith(prefix + "."):
      return i
  return None  # the package roots and calibrate.reference sit outside the pipeline


def test_imports_run_down_the_pipeline():
  up = sorted((m, d) for m, deps in _graph().items() for d in deps
              if _layer(m) is not None and _layer(d) is not None and _layer(d) > _layer(m))
  assert up == []
