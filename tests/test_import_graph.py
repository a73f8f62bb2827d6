"""No import circles between the project's modules, and the layering of CONVENTIONS.md holds.

Read from the source (ast), so it is fast and sees every import: module-level ones and those inside
functions (a lazy import still ties two modules together); imports under `if TYPE_CHECKING:` are
for type hints only and do not count.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("models", "training", "service", "benchmarks")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            parts = f.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def _type_checking_nodes(tree: ast.Module) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            ids.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return ids


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules `name` imports, anywhere in the file except under TYPE_CHECKING."""
    tree = ast.parse(path.read_text())
    skip = _type_checking_nodes(tree)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    targets: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            targets.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            targets.add(base)
            targets.update(f"{base}.{a.name}" for a in node.names)
    deps = set()
    for t in targets:
        parts = t.split(".")
        for i in range(1, len(parts) + 1):
            candidate = ".".join(parts[:i])
            # a package's __init__ importing its own submodules is how packages work, not a circle
            if candidate in modules and candidate != name and not candidate.startswith(name + "."):
                deps.add(candidate)
    return deps


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
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
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_checker_sees_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_circles():
    graph = _graph()
    assert "training.methods" in graph and "models.store" in graph
    cycles = _cycles(graph)
    assert cycles == [], {tuple(c): {m: sorted(graph[m] & set(c)) for m in c} for c in cycles}


def test_layering():
    """models never imports training/service/benchmarks; service never imports training, and back."""
    graph = _graph()
    forbidden = {"models": ("training", "service", "benchmarks"), "service": ("training",), "training": ("service",)}
    bad = [(m, d) for m, deps in graph.items() for d in deps if d.split(".")[0] in forbidden.get(m.split(".")[0], ())]
    assert bad == []


def test_formerly_circular_modules_import_in_either_order():
    for first, second in [("training.methods", "training.config"), ("training.config", "training.methods")]:
        code = f"import {first}, {second}, sys; assert 'torch' not in sys.modules, 'config stays light'"
        subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
