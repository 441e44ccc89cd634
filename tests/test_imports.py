"""The package's import graph: no cycles (lazy imports inside functions included), and
every module importable in any order in a fresh interpreter (a different random order
each run, its seed in the failure message)."""

from __future__ import annotations

import ast
import random
import subprocess
import sys
from pathlib import Path

import fusedattn
import fusedattn.kernels

PACKAGE_ROOT = Path(fusedattn.__file__).parent
KERNELS_ROOT = Path(fusedattn.kernels.__file__).parent  # kernels/, installed as fusedattn.kernels


def _modules() -> dict[str, Path]:
    modules = {}
    for prefix, root in (("fusedattn", PACKAGE_ROOT), ("fusedattn.kernels", KERNELS_ROOT)):
        for path in root.rglob("*.py"):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join((prefix, *parts))] = path
    return modules


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Package modules that name imports anywhere in its source (function bodies too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in graph[node]:
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return components


def test_no_import_cycles():
    modules = _modules()
    # A package imports its own submodules (fusedattn/__init__ lists its API); those edges
    # are how a package is built, not a cycle between layers.
    graph = {
        name: {target for target in _imports(name, path, modules) if not name.startswith(target + ".")}
        for name, path in modules.items()
    }
    assert _cycles(graph) == []


def test_cycle_detector_sees_a_lazy_import_cycle():
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]


def test_every_module_imports_in_any_order():
    names = sorted(name for name in _modules() if not name.endswith("__main__"))
    order = names[:]
    seed = random.randrange(2**32)
    random.Random(seed).shuffle(order)
    script = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\n"
    result = subprocess.run([sys.executable, "-c", script, *order], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"order seed {seed}: {result.stderr[-2000:]}"
