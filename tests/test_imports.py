"""The import graph of `pmod`, read from the source (every import statement, those inside functions too, and
`importlib.import_module("pmod....")` with a literal name): no cycles, and the layers import one way
(ARCHITECTURE.md). A lazy import inside a function still couples two modules, so it counts."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# (importer prefix, imported prefix): edges that must not exist, with the reason in ARCHITECTURE.md.
FORBIDDEN = [
    ("pmod.io", "pmod.modeling"),       # io takes a build(config) callable; the model imports io
    ("pmod.peft", "pmod.training"),     # training drives strategies; peft owns their protocol
    ("pmod.modeling", "pmod.training"),
    ("pmod.modeling", "pmod.peft"),
    ("pmod.modeling", "pmod.evaluation"),
]


def _modules() -> dict[str, Path]:
    out = {}
    for path in (ROOT / "pmod").rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The module a dotted name lives in (`pmod.io.files.read_tensors` -> `pmod.io.files`)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, set[str]]:
    """{module: modules of pmod it imports}, statically."""
    modules = _modules()
    graph = {}
    for mod, path in modules.items():
        package = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
        names = []
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                names += [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
                names += [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module":
                if node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                    names.append(node.args[0].value)
        graph[mod] = {r for n in names if n.split(".")[0] == "pmod" and (r := _resolve(n, modules)) not in (None, mod)}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, out, counter = {}, {}, set(), [], [], [0]

    def visit(root: str) -> None:
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_walker_sees_lazy_imports_and_finds_a_planted_cycle():
    graph = import_graph()
    assert "pmod.io" in graph["pmod.modeling.llava"]  # a top-level import
    assert "pmod.generate" in graph["pmod.modeling.llava"]  # the lazy one inside generate()
    assert cycles({**graph, "pmod.io.files": graph["pmod.io.files"] | {"pmod.modeling.llava"}})  # would close a circle


def test_pmod_has_no_import_cycle():
    found = cycles(import_graph())
    assert not found, "import cycles among pmod modules:\n" + "\n".join(" <-> ".join(c) for c in found)


@pytest.mark.parametrize("importer,imported", FORBIDDEN)
def test_layers_import_one_way(importer, imported):
    bad = sorted(f"{m} -> {d}" for m, deps in import_graph().items() if m.startswith(importer)
                 for d in deps if d == imported or d.startswith(imported + "."))
    assert not bad, f"{importer} must not import {imported}: " + ", ".join(bad)
