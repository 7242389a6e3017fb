"""The import graph of gpt_jax (every import, at module level or inside a function): no cycle, and no
stage module imports another stage (stages meet only through run directories, runs.py)."""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def import_graph() -> dict[str, set[str]]:
  mods = {}
  for root, _, files in os.walk(os.path.join(ROOT, "gpt_jax")):
    for f in files:
      if f.endswith(".py"):
        path = os.path.join(root, f)
        name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
        mods[name.removesuffix(".__init__")] = path
  graph = {m: set() for m in mods}
  for m, path in mods.items():
    package = m if path.endswith("__init__.py") else m.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(open(path).read())):
      if isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
          parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
          base = ".".join(parts + ([base] if base else []))
        for alias in node.names:
          child = f"{base}.{alias.name}"
          if child in mods:
            graph[m].add(child)
          elif base in mods:
            graph[m].add(base)
      elif isinstance(node, ast.Import):
        graph[m].update(a.name for a in node.names if a.name in mods)
    graph[m].discard(m)
  return graph


def test_the_graph_sees_the_imports():
  g = import_graph()
  assert "gpt_jax.runs" in g["gpt_jax.stages.sft"] and "gpt_jax.loop" in g["gpt_jax.stages.grpo"]


def test_no_import_cycle():
  g, state, cycles = import_graph(), {}, []

  def visit(u, stack):
    state[u] = "open"
    stack.append(u)
    for v in sorted(g[u]):
      if state.get(v) == "open":
        cycles.append(" -> ".join(stack[stack.index(v) :] + [v]))
      elif v not in state:
        visit(v, stack)
    stack.pop()
    state[u] = "done"

  for m in sorted(g):
    if m not in state:
      visit(m, [])
  assert cycles == []


def test_no_stage_imports_another_stage():
  g = import_graph()
  stage_of = lambda m: m.split(".")[2] if m.startswith("gpt_jax.stages.") else None
  crossing = [
    f"{a} -> {b}" for a in g for b in g[a] if stage_of(a) and stage_of(b) and stage_of(a) != stage_of(b)
  ]
  assert crossing == []
