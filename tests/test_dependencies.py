"""Dependencies are declared exactly: every third-party module the library imports belongs to a
distribution declared in pyproject.toml (core or an extra), and every core dependency is imported."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ("prunecore", "dataprune", "tokenprune", "pipelines")
# needed at run time without being imported by name: torchvision backs open_clip's transforms
IMPLICIT = {"torchvision"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(req: str) -> str:
    return canonical(re.split(r"[<>=!~\[; ]", req.strip(), maxsplit=1)[0])


def declared() -> tuple[set[str], set[str]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {requirement_name(r) for r in project["dependencies"]}
    extras = {requirement_name(r) for reqs in project["optional-dependencies"].values() for r in reqs}
    return core, extras


def imported_top_modules(packages=LIBRARY) -> set[str]:
    names = set()
    for pkg in packages:
        for path in (ROOT / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names.update(a.name.split(".")[0] for a in node.names)
                elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                    names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - set(LIBRARY) - {"__future__"}


def imported_distributions() -> dict[str, set[str]]:
    dists = importlib.metadata.packages_distributions()
    return {m: {canonical(d) for d in dists.get(m, [m])} for m in imported_top_modules()}


def test_every_import_is_declared():
    core, extras = declared()
    undeclared = {m: d for m, d in imported_distributions().items() if not d & (core | extras)}
    assert undeclared == {}


def test_every_core_dependency_is_used():
    core, _ = declared()
    used = set().union(*imported_distributions().values()) | IMPLICIT
    assert core - used == set()
