"""The layout's rules, checked from the source: no import cycle inside the project (imports
inside functions count too), no ``_private`` name imported from another module, importing any
top-level package loads no faiss, open_clip or transformers, and ``tokenprune`` / ``pipelines``
show their entry points to ``dir()`` and to type checkers."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("prunecore", "dataprune", "tokenprune", "pipelines")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def resolve_from(module: str, path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def imports_of(module: str, path: Path, modules: dict[str, Path]):
    """Yield (imported module, imported name or None) for every import in the file."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None
        elif isinstance(node, ast.ImportFrom):
            base = resolve_from(module, path, node)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                yield (sub, None) if sub in modules else (base, alias.name)


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        for target, _ in imports_of(module, path, modules):
            if target in modules and target != module and not module.startswith(target + "."):
                graph[module].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle():
    assert find_cycle(import_graph()) is None


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_private_name_crosses_a_module():
    modules = project_modules()
    crossings = []
    for module, path in modules.items():
        for target, name in imports_of(module, path, modules):
            top = target.split(".")[0]
            if name and name.startswith("_") and not name.startswith("__") and top in PACKAGES:
                crossings.append(f"{module} imports {name} from {target}")
    assert crossings == []


@pytest.mark.slow
@pytest.mark.parametrize("package", PACKAGES)
def test_package_import_is_light(package):
    heavy = "('faiss', 'open_clip', 'transformers', 'langchain_core', 'llama_index', 'haystack')"
    code = f"import sys, {package}; print(sorted(m for m in {heavy} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def type_checking_imports(package: str) -> dict[str, str]:
    """``{name: module}`` imported in the ``if TYPE_CHECKING:`` block of ``package/__init__.py``."""
    path = ROOT / package / "__init__.py"
    block = next(
        node
        for node in ast.parse(path.read_text()).body
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"
    )
    names = {}
    for node in block.body:
        base = resolve_from(package, path, node)
        for alias in node.names:
            names[alias.name] = f"{base}.{alias.name}" if f"{base}.{alias.name}" in project_modules() else base
    return names


@pytest.mark.parametrize("package", ["tokenprune", "pipelines"])
def test_entry_points_are_listed_shown_and_typed(package):
    """``__all__`` lists the lazy exports, ``dir()`` shows them, the ``TYPE_CHECKING`` block
    imports each from the module it resolves from, and each resolves."""
    module = importlib.import_module(package)
    assert module.__all__ == sorted(module._EXPORTS)
    assert set(module.__all__) <= set(dir(module))
    typed = type_checking_imports(package)
    assert set(typed) == set(module.__all__)
    for name, path in module._EXPORTS.items():
        assert typed[name] == path, name
        assert getattr(module, name) is not None
