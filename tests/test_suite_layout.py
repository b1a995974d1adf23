"""The test suite's own layout: test files mirror the packages, no test module imports another
one (shared code lives in tests/helpers, shared fixtures in conftest.py files), every marker
used is registered, and conftest files stay free of heavy imports (collection stays cheap)."""

import ast
import tomllib
from pathlib import Path

import pytest

from tests.helpers import REPO

TESTS = REPO / "tests"
FOLDERS = {"prunecore", "dataprune", "tokenprune", "pipelines", "benchmarks", "helpers"}  # benchmarks/: scripts
TOP_LEVEL = {"test_layout.py", "test_dependencies.py", "test_docs_tables.py", "test_doc_examples.py"}
TOP_LEVEL.add(Path(__file__).name)
HEAVY = {"torch", "transformers", "open_clip", "faiss", "datasets", "ray", "haystack", "llama_index", "langchain_core"}


def python_files() -> list[Path]:
    return sorted(TESTS.rglob("*.py"))


def imported_modules(path: Path, *, top_level_only: bool = False) -> set[str]:
    """Modules ``path`` imports (every ``import`` statement, or only the module-level ones)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    names = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_test_files_mirror_the_packages():
    misplaced = [
        path.relative_to(TESTS).as_posix()
        for path in python_files()
        if path.name.startswith("test_")
        and not (path.parent == TESTS and path.name in TOP_LEVEL)
        and path.relative_to(TESTS).parts[0] not in FOLDERS
    ]
    assert not misplaced, f"move these under tests/<package>/ (as the code they test): {misplaced}"
    assert not list((TESTS / "helpers").glob("test_*.py")), "tests/helpers holds helpers, not tests"


def test_no_test_module_imports_another_test_module_or_a_conftest():
    bad = {}
    for path in python_files():
        names = [
            name
            for name in imported_modules(path)
            if name.split(".")[-1].startswith("test_") or name.split(".")[-1] == "conftest"
        ]
        if names:
            bad[path.relative_to(TESTS).as_posix()] = names
    assert not bad, f"put shared code in tests/helpers (fixtures in a conftest.py): {bad}"


def test_conftest_files_import_nothing_heavy_at_module_level():
    heavy = {
        path.relative_to(TESTS).as_posix(): sorted(
            name for name in imported_modules(path, top_level_only=True) if name.split(".")[0] in HEAVY
        )
        for path in [*TESTS.rglob("conftest.py"), *(TESTS / "helpers").glob("__init__.py")]
    }
    assert not any(heavy.values()), f"import these inside the fixture that needs them: {heavy}"


def used_markers() -> set[str]:
    """Custom marker names of ``pytest.mark.NAME`` in the test files."""
    builtin = {"parametrize", "skip", "skipif", "xfail", "usefixtures", "filterwarnings"}
    names = set()
    for path in python_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute):
                if node.value.attr == "mark" and getattr(node.value.value, "id", None) == "pytest":
                    names.add(node.attr)
    return names - builtin


def test_every_marker_is_registered_and_slow_is_used():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    registered = {line.split(":")[0].strip() for line in config["markers"]}
    assert "--strict-markers" in config["addopts"] and "--import-mode=importlib" in config["addopts"]
    assert used_markers() <= registered
    assert "slow" in used_markers()


@pytest.mark.parametrize("target", ["test:", "test-fast:"])
def test_makefile_runs_everything_in_test_and_not_slow_in_test_fast(target):
    lines = (REPO / "Makefile").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(target))
    recipe = lines[start + 1].strip()
    assert recipe.startswith("$(PY) -m pytest -q")
    assert ('-m "not slow"' in recipe) == (target == "test-fast:")
