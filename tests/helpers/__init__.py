"""Helpers shared by the test modules (plain functions and constants; fixtures live in the
``conftest.py`` files). Imports here stay light: heavy libraries are imported inside functions."""

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def shared_data_dir() -> Path | None:
    """Folder with the read-only real data (CIFAR-10 shards, MNIST, QA, text), or None."""
    env = os.environ.get("PRUNEKIT_DATA")
    candidates = [Path(env)] if env else []
    candidates.append(REPO.parent / "shared" / "data")
    for path in candidates:
        if path.is_dir():
            return path
    return None


def artifact_bytes(out: Path) -> dict[str, bytes]:
    """Every artifact file under ``out`` except the stage records (which hold timings) and the
    marker and lock of the folder (which hold a creation time and the last run's pid)."""
    return {
        str(p.relative_to(out)): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.name not in ("_stage.json", ".prunekit.json", ".prunekit.lock")
    }
