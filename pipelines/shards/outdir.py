"""The output folder: one run at a time (a lock), and prunekit touches only what it created.

* **Lock**: ``OUT/.prunekit.lock`` is held with ``flock`` for the whole run; a second run on
  the same ``OUT`` exits with :class:`OutputLocked` naming the holder (pid, host, start
  time), or waits for it (``wait=True``, CLI ``--wait-lock``). The kernel drops the lock when
  the holder dies, so a killed run never leaves a stale lock.
* **Ownership**: ``OUT/.prunekit.json`` marks a folder prunekit created. A stage folder's
  files are prunekit's only when its record (``_stage.json``) lists them: the record is the
  ledger of every file the stage claimed before writing it and, once done, of every file it
  verified (name, size, sha256). Any other file under ``OUT`` (an extra ``shard-000099.tar``,
  a ``my_backup.tar``, ``done/notes.json``) is foreign, whatever its name: the run is refused
  before anything is written or deleted (:class:`ForeignFiles`), naming the files. Folders
  without a record (``report/``) are judged by their file-name patterns. Input files inside
  ``OUT`` are refused too (a rerun could delete them).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from prunecore.io import atomic_write_json

from .stage import (
    STAGE_FOLDERS,
    ForeignFiles,
    PipelineError,
    folder_files,
    foreign_message,
    is_owned_file,
    is_temporary,
    read_record,
    stage_foreign_files,
)

MARKER = ".prunekit.json"
LOCK = ".prunekit.lock"
TOP_LEVEL = (MARKER, LOCK)


class OutputLocked(PipelineError):
    """Another prunekit run holds the output folder."""


def is_owned(rel: str, patterns: Mapping[str, Sequence[str]]) -> bool:
    """Whether ``rel`` (a path relative to OUT, ``/``-separated) is a file prunekit writes,
    by name: the marker/lock (and the marker's temporary: a concurrent run may be publishing
    it), or ``folder/inner`` where ``inner`` matches that folder's patterns. Stage folders
    are judged by their records instead (:func:`foreign_files`)."""
    if rel in TOP_LEVEL or (is_temporary(rel) and rel.startswith(tuple(f".{name}." for name in TOP_LEVEL))):
        return True
    folder, _, inner = rel.partition("/")
    return folder in patterns and bool(inner) and is_owned_file(inner, patterns[folder])


def foreign_files(out: Path, patterns: Mapping[str, Sequence[str]]) -> list[str]:
    """The paths under ``out`` (relative) that prunekit does not own. A stage
    folder (:data:`~pipelines.shards.stage.STAGE_FOLDERS`) owns what its record lists (nothing
    without a record); another folder in ``patterns`` what its patterns match; any other
    top-level entry is foreign."""
    found: list[str] = []
    for entry in sorted(os.listdir(out)):
        path = out / entry
        if path.is_dir() and entry in STAGE_FOLDERS and entry in patterns:
            found += [f"{entry}/{rel}" for rel in stage_foreign_files(path, read_record(path), patterns[entry])]
        elif path.is_dir() and entry in patterns:
            found += [f"{entry}/{rel}" for rel in folder_files(path) if not is_owned(f"{entry}/{rel}", patterns)]
        elif not is_owned(entry, patterns):
            found.append(entry + "/" if path.is_dir() else entry)
    return found


def check_inputs_outside(out: Path, inputs: Iterable[str | os.PathLike]) -> None:
    """Raise :class:`ForeignFiles` when an input file lies inside ``out``."""
    root = out.resolve()
    for path in inputs:
        real = Path(path).resolve()
        if real == root or root in real.parents:
            raise ForeignFiles(
                f"input {os.fspath(path)} lies inside the output folder {out}: a rerun could overwrite or "
                "delete it; choose another --out (or move the input out of it)"
            )


def claim_output(out: Path, patterns: Mapping[str, Sequence[str]]) -> None:
    """Refuse ``out`` unless it is missing, empty, or holds only prunekit's files; then create
    it and its marker. Nothing is written or deleted before the check passes."""
    if out.exists() and not out.is_dir():
        raise ForeignFiles(f"--out {out} is a file, not a folder: choose another --out")
    if out.is_dir():
        foreign = foreign_files(out, patterns)
        if foreign:
            raise ForeignFiles(foreign_message(f"--out {out}", foreign))
    out.mkdir(parents=True, exist_ok=True)
    if not (out / MARKER).exists():
        atomic_write_json(out / MARKER, {"tool": "prunekit", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "another process"
    return f"pid {info.get('pid')} on host {info.get('host')} (since {info.get('since')})"


@contextlib.contextmanager
def output_lock(out: Path, *, wait: bool = False, log=print):
    """Hold an exclusive ``flock`` on ``out/.prunekit.lock`` for the ``with`` block.

    Held: raises :class:`OutputLocked` naming the holder, or with ``wait`` blocks until it is
    released. The file records this holder's pid, host and start time.
    """
    path = out / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            holder = _holder(path)
            if not wait:
                raise OutputLocked(
                    f"--out {out} is in use by {holder}: wait for that run to finish, pass --wait-lock to queue "
                    "behind it, or choose another --out"
                ) from None
            log(f"[lock] {out} is in use by {holder}: waiting")
            fcntl.flock(fd, fcntl.LOCK_EX)
        record = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the flock
