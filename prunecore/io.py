"""Atomic writes and digests: the one place that publishes files and fingerprints them.

A writer fills a temporary file (unique per process) in the destination folder, then
``os.replace`` publishes it, so a killed or failed writer never leaves a half-written file
under the final name. Published files are readable by everyone (mode 0644).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path

FILE_MODE = 0o644
TMP_SUFFIX = ".tmp"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, mode: int = FILE_MODE):
    """Yield a temporary path next to ``path``; on success rename it over ``path``.

    On any exception the temporary file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_json(path: str | os.PathLike, obj, *, indent: int = 1) -> None:
    """Write ``obj`` as JSON (sorted keys, non-JSON values as ``str``) atomically."""
    text = json.dumps(obj, indent=indent, sort_keys=True, default=str)
    atomic_write_bytes(path, text.encode())


def json_digest(obj) -> str:
    """sha256 hex of ``obj``'s canonical JSON (sorted keys): a fingerprint of parameters."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def file_digest(path: str | os.PathLike, *, chunk_size: int = 1 << 20) -> str:
    """sha256 hex of a file's bytes, read in ``chunk_size`` pieces (bounded memory)."""
    sha = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk_size), b""):
            sha.update(block)
    return sha.hexdigest()
