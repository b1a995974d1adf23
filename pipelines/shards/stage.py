"""The stage base: fingerprints, skip-if-done, resume, the atomic completion marker.

Every stage has ``params`` (what changes its output) and ``inputs`` (fingerprints of the
upstream artifacts / input files). Its fingerprint is a hash of both. The folder holds
``_stage.json``: ``{"fingerprint", "params", "state": "running"|"done", "summary"}``.

* Same fingerprint and state ``done``: the stage is skipped and its artifact reused.
* Same fingerprint and state ``running`` (a killed run): the stage resumes; embed and write
  keep their finished units (one chunk per input shard; one file per output shard).
* Different fingerprint: the stage's own files are deleted (a file it does not own stops
  the run, nothing deleted) and the stage reruns; the stages after it rerun too, because
  their inputs are the artifact digests of the stages before them.
* Verification: a ``done`` record lists every artifact file with its size, mtime and sha256.
  Before a stage is skipped, each file must still have its size, and its sha256 when its
  mtime changed (or always, with ``verify=True``). A changed or missing file is deleted with
  the unit it belongs to (an embed chunk, an output shard) and the stage resumes, redoing
  just those units; its new digest then reruns the later stages if the repaired output differs.
* Ownership: the record is also the ledger of what the stage wrote. Before a file is written
  its name is claimed (``owned`` in the ``running`` record; a name ending in ``/`` claims a
  folder the stage builds whole); a ``done`` record lists exactly the files it verified. Only
  those files (and their temporaries) are the stage's: any other file in the folder is
  foreign, never used, listed in the record or deleted, and stops the run (:class:`ForeignFiles`).
* Consistency: before a stage is recorded ``done``, :meth:`Stage.inconsistent` checks the
  artifact as a whole (every planned unit present and matching its own record, the rows
  adding up); units that fail are redone once, and if the artifact still fails the record
  stays ``running`` (a rerun redoes them again) instead of marking a broken artifact done.

All files are written through :mod:`prunecore.io` (temporary name + rename), so a
finished-looking file is a finished file. Inputs are opened read-only and never modified.
"""

from __future__ import annotations

import ctypes
import fnmatch
import json
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from prunecore.io import TMP_SUFFIX, atomic_path, atomic_write_json, file_digest, json_digest

STAGE_FILE = "_stage.json"
VERSION = 2  # 2: done records list their artifact files (size, mtime, sha256)
STATUS_OK = "ok"
# reasons for samples that never reach the selection methods
MISSING_IMAGE = "missing_image"
UNDECODABLE = "undecodable"
NO_EMBEDDING = "no_embedding"
# folders under OUT that stages write (each registers its name): their record is their ledger
STAGE_FOLDERS: set[str] = set()


class PipelineError(ValueError):
    """A pipeline input problem that stops the run (the message says what and where)."""


class ForeignFiles(PipelineError):
    """The output folder holds files prunekit did not write (or input files)."""


def foreign_message(where, rels: list[str]) -> str:
    """The one-line refusal for files prunekit did not write (``rels``, relative to ``where``)."""
    shown = ", ".join(rels[:5]) + (f" and {len(rels) - 5} more" if len(rels) > 5 else "")
    return (
        f"{where} holds files prunekit did not write ({shown}): they are in no stage record, so prunekit "
        "neither uses nor deletes them and stops here; move them out of that folder (or choose another --out)"
    )


def is_temporary(name: str) -> bool:
    """Whether a file name is one of :func:`prunecore.io.atomic_path`'s temporaries."""
    return name.startswith(".") and name.endswith(TMP_SUFFIX)


def is_owned_file(inner: str, patterns) -> bool:
    """Whether ``inner`` (a ``/``-separated path inside a stage folder) matches one of the
    stage's artifact ``patterns`` (fnmatch), its record, or is a temporary. Used only for
    folders without a ledger (``report/``, records written before ledgers existed)."""
    base = inner.rsplit("/", 1)[-1]
    return inner == STAGE_FILE or is_temporary(base) or any(fnmatch.fnmatchcase(inner, p) for p in patterns)


def temporary_target(rel: str) -> str | None:
    """The file a temporary ``DIR/.NAME.XXXXXXXX.tmp`` is publishing (``DIR/NAME``), else None."""
    folder, _, base = rel.rpartition("/")
    if not is_temporary(base) or base.count(".") < 3:
        return None
    name = base[1 : -len(TMP_SUFFIX)].rsplit(".", 1)[0]
    return f"{folder}/{name}" if folder else name


def ledger(rec: dict | None) -> set[str] | None:
    """The names a stage record says the stage wrote or claimed (``files`` of a ``done``
    record, ``owned`` of any record); ``None`` for a ``running`` record written before
    records kept a ledger (its files can only be judged by the stage's patterns)."""
    if rec is None:
        return set()
    if "owned" not in rec and "files" not in rec:
        return None
    return set(rec.get("owned", ())) | set(rec.get("files", {}))


def owns(rel: str, names: set[str]) -> bool:
    """Whether ``rel`` (``/``-separated, inside a stage folder) is the stage's by its ledger
    ``names``: the record itself, a claimed name, a file under a claimed folder (``dir/``),
    or a temporary publishing one of those."""
    if rel == STAGE_FILE or rel in names:
        return True
    if any(rel[: i + 1] in names for i, c in enumerate(rel) if c == "/"):
        return True
    target = temporary_target(rel)
    return target is not None and target != rel and owns(target, names)


def stage_foreign_files(stage_dir: Path, rec: dict | None, patterns=()) -> list[str]:
    """Files under ``stage_dir`` (relative, sorted) that its record ``rec`` does not own
    (``patterns``: the stage's artifact patterns, for a record without a ledger)."""
    names = ledger(rec)
    if names is None:
        return [rel for rel in folder_files(stage_dir) if not is_owned_file(rel, patterns)]
    return [rel for rel in folder_files(stage_dir) if not owns(rel, names)]


def folder_files(folder: Path) -> list[str]:
    """Every file under ``folder`` (relative, ``/``-separated, sorted); none when it is absent."""
    found = []
    for root, _, files in os.walk(folder):
        rel_root = os.path.relpath(root, folder).replace(os.sep, "/")
        found += [name if rel_root == "." else f"{rel_root}/{name}" for name in files]
    return sorted(found)


def read_record(stage_dir: Path) -> dict | None:
    """A stage folder's ``_stage.json`` (None when absent); an unreadable one raises
    :class:`PipelineError` (prunekit cannot tell which files there are its own)."""
    path = stage_dir / STAGE_FILE
    try:
        rec = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise PipelineError(
            f"{path} is unreadable ({exc}): prunekit cannot tell which files in {stage_dir} it wrote; "
            f"move {stage_dir} away (or choose another --out) and rerun"
        ) from None
    if not isinstance(rec, dict):
        raise PipelineError(f"{path} is not a stage record: move {stage_dir} away (or choose another --out) and rerun")
    return rec


def save_npy(path: Path, arr: np.ndarray) -> None:
    """Publish ``arr`` as ``.npy`` atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, arr, allow_pickle=False)


# few distinct values per table: stored dictionary-encoded, read back as pandas categoricals
# (1-2 bytes per row in memory instead of a string each)
CATEGORY_COLUMNS = ("shard", "status", "reason")


def _glibc():
    """The C library when it is glibc (``malloc_trim``), else None."""
    try:
        lib = ctypes.CDLL(None)
        return lib if hasattr(lib, "malloc_trim") else None
    except OSError:  # pragma: no cover - no C library to load
        return None


LIBC = _glibc()

ROW_GROUP_ROWS = 1 << 16  # rows per parquet row group: bounds the writer's encode buffers


def release_scratch() -> None:
    """Return the memory Arrow's pool keeps after a read or write (mimalloc/jemalloc hold
    freed pages for reuse) to the OS, so the next stage's numpy arrays do not stack on it;
    likewise the free pages of the C heap (glibc keeps freed arrays below its adaptive mmap
    threshold, up to 32 MB each, in the heap)."""
    pa.default_memory_pool().release_unused()
    if LIBC is not None:
        LIBC.malloc_trim(0)


def dictionary_columns(schema: pa.Schema) -> list[str]:
    """The columns to dictionary-encode in parquet: those that are dictionaries already (few
    distinct values). Per-row columns (keys, row ids, sizes) are stored plain: trying a
    dictionary on them costs a hash table per column chunk and gains nothing."""
    return [f.name for f in schema if pa.types.is_dictionary(f.type)]


def save_parquet(path: Path, df: pd.DataFrame | pa.Table, metadata: dict | None = None) -> None:
    """Publish ``df`` (a DataFrame or an Arrow table) as parquet atomically, in row groups of
    :data:`ROW_GROUP_ROWS` (bounded write buffers); ``metadata`` values go into the schema as
    JSON. DataFrame columns named in :data:`CATEGORY_COLUMNS` are stored dictionary-encoded."""
    if isinstance(df, pa.Table):
        table = df
    else:
        df = df.astype({c: "category" for c in CATEGORY_COLUMNS if c in df.columns and df[c].dtype != "category"})
        table = pa.Table.from_pandas(df, preserve_index=False)
    if metadata:
        meta = dict(table.schema.metadata or {})
        meta.update({k.encode(): json.dumps(v, default=str).encode() for k, v in metadata.items()})
        table = table.replace_schema_metadata(meta)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, row_group_size=ROW_GROUP_ROWS, use_dictionary=dictionary_columns(table.schema))
    del table
    release_scratch()


def read_parquet(path: str | os.PathLike, *, columns=None, fix: str = "", arrow: bool = False):
    """A parquet file as a DataFrame (or with ``arrow`` a pyarrow Table), naming the file (and
    ``fix``) when it is not readable parquet. The Arrow buffers are released column by column
    while the frame is built, so the peak is about one copy of the data, not two."""
    try:
        table = pq.read_table(path, columns=columns, memory_map=True)  # no read buffer for the compressed file
        if arrow:
            return table
        return table.to_pandas(split_blocks=True, self_destruct=True, types_mapper=string_dtype)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise _unreadable(path, exc, fix) from exc


def _unreadable(path, exc: Exception, fix: str) -> Exception:
    """The error to raise for a parquet file that could not be read (a missing file stays as is)."""
    if isinstance(exc, FileNotFoundError):
        return exc
    first = (str(exc).splitlines() or [type(exc).__name__])[0]
    return PipelineError(f"{path} is not a readable parquet file ({first}){': ' + fix if fix else ''}")


def string_dtype(arrow_type):
    """Arrow strings -> pandas' Arrow-backed ``str`` dtype (no Python object per value)."""
    if pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type):
        return pd.StringDtype(storage="pyarrow", na_value=np.nan)
    return None


def parquet_columns(path: str | os.PathLike) -> list[str]:
    """Column names of a parquet file from its footer (the data is not read)."""
    try:
        return list(pq.read_schema(path).names)
    except (pa.ArrowException, OSError) as exc:
        raise _unreadable(path, exc, "re-export it") from exc


class Stage:
    """Base class: fingerprinting, skip-if-done, resume, atomic completion marker.

    Subclasses set ``name`` and ``owned`` (fnmatch patterns of the files the stage writes,
    relative to its folder) and implement ``compute(log) -> summary dict`` (writes the
    artifact) and ``load() -> artifact`` (reads it back). ``digest`` (set by :meth:`run`)
    identifies the finished artifact's content: the later stages take it as their input.
    """

    name = "stage"
    owned: tuple[str, ...] = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        STAGE_FOLDERS.add(cls.name)

    def __init__(self, out: str | os.PathLike, params: dict, inputs: dict):
        self.out = Path(out)
        self.dir = self.out / self.name
        self.params = params
        self.inputs = inputs
        self.fingerprint = json_digest({"stage": self.name, "version": VERSION, "params": params, "inputs": inputs})
        self.skipped = False
        self.repaired: list[str] = []
        self.summary: dict = {}
        self.digest = ""
        self.names: set[str] = set()  # the ledger: files the stage claimed (see :meth:`claim`)

    def record(self) -> dict | None:
        """The folder's ``_stage.json`` (None when absent; unreadable raises :class:`PipelineError`)."""
        return read_record(self.dir)

    def finished(self) -> bool:
        """Whether a run with this fingerprint completed (its files are checked by :meth:`run`)."""
        rec = self.record()
        return bool(rec and rec.get("fingerprint") == self.fingerprint and rec.get("state") == "done")

    def _write_record(self, state: str, **extra) -> None:
        rec = {"fingerprint": self.fingerprint, "state": state, "params": self.params, "inputs": self.inputs}
        atomic_write_json(self.dir / STAGE_FILE, {**rec, "owned": sorted(self.names), **extra})

    def claim(self, rels) -> None:
        """Record ``rels`` (relative, ``/``-separated; ``dir/`` claims a folder built whole) as
        the stage's before they are written: a killed run's files stay provably prunekit's.
        Call it in the driver process (executors' workers write only claimed names)."""
        new = set(rels) - self.names
        if new:
            self.names |= new
            self._write_record("running")

    def planned_files(self) -> list[str]:
        """Files the stage will write that are known before :meth:`compute` (claimed up front;
        compute claims the rest as it learns their names). Default: the patterns without wildcards."""
        return [p for p in self.owned if not any(c in p for c in "*?[")]

    def foreign_files(self) -> list[str]:
        """Files in the stage folder that its ledger does not own (relative, sorted)."""
        return stage_foreign_files(self.dir, self.record(), self.owned)

    def artifact_files(self) -> list[str]:
        """The stage's existing files (relative, ``/``-separated): the claimed names, and the
        files under claimed folders; the record and temporaries excluded."""
        found = set()
        for rel in self.names:
            path = self.dir / rel
            if rel.endswith("/"):
                found.update(
                    q.relative_to(self.dir).as_posix()
                    for q in path.rglob("*")
                    if q.is_file() and not is_temporary(q.name)
                )
            elif path.is_file():
                found.add(rel)
        return sorted(found)

    def known_digests(self) -> dict[str, str]:
        """sha256 of artifact files the stage hashed while writing them (not read again)."""
        return {}

    def file_table(self, fresh=()) -> dict[str, list]:
        """``{relative path: [size, mtime_ns, sha256]}`` of every artifact file; files in
        ``fresh`` (redone in this run) are hashed from disk, not trusted to a writer's hash."""
        known = self.known_digests()
        table = {}
        for rel in self.artifact_files():
            path = self.dir / rel
            st = path.stat()
            sha = None if rel in fresh else known.get(rel)
            table[rel] = [st.st_size, st.st_mtime_ns, sha or file_digest(path)]
        return table

    def changed_files(self, files: dict, *, verify: bool = False) -> dict[str, str]:
        """``{relative path: what changed}`` for recorded files that are missing, changed size,
        or (mtime changed, or ``verify``) changed sha256. Cheap by default: a file is hashed
        only when its mtime moved."""
        bad = {}
        for rel, (size, mtime_ns, sha) in sorted(files.items()):
            path = self.dir / rel
            try:
                st = path.stat()
            except FileNotFoundError:
                bad[rel] = "missing"
                continue
            if st.st_size != size:
                bad[rel] = f"size {st.st_size}, recorded {size}"
            elif (verify or st.st_mtime_ns != mtime_ns) and file_digest(path) != sha:
                bad[rel] = "sha256 differs from the record"
        return bad

    def inconsistent(self, files: dict) -> dict[str, str]:
        """``{relative path: problem}`` of artifact files that disagree with the rest of the
        artifact after :meth:`compute` (``files``: :meth:`file_table`); :meth:`invalidate`
        deletes them with their units. Default: none (the stage rewrites its files whole)."""
        return {}

    def invalidate(self, rels: list[str]) -> list[str] | None:
        """Delete the changed files ``rels`` so that :meth:`compute` redoes them (subclasses
        also delete the rest of the unit each belongs to); returns the files deleted (None:
        ``rels``). Only the stage's own files."""
        for rel in rels:
            if owns(rel, self.names):
                (self.dir / rel).unlink(missing_ok=True)
        return None

    def clear(self) -> None:
        """Delete the stage's own files (by its ledger) and the folders left empty; a file it
        does not own raises :class:`ForeignFiles` (nothing deleted)."""
        foreign = self.foreign_files()
        if foreign:
            raise ForeignFiles(foreign_message(self.dir, foreign))
        for p in sorted(self.dir.rglob("*"), key=lambda q: len(q.parts), reverse=True):
            if p.is_dir():
                if not any(p.iterdir()):
                    p.rmdir()
            else:
                p.unlink()
        self.names = set()

    def run(self, log=print, *, verify: bool = False):
        """Run (or skip, or resume, or repair) the stage; return its artifact.

        ``verify``: check the sha256 of every recorded artifact file before skipping (by
        default only files whose size or mtime changed are hashed). Files in the folder that
        the record does not own stop the run (:class:`ForeignFiles`) before anything is deleted."""
        rec = self.record()
        foreign = stage_foreign_files(self.dir, rec, self.owned)
        if foreign:
            raise ForeignFiles(foreign_message(self.dir, foreign))
        same = bool(rec and rec.get("fingerprint") == self.fingerprint)
        self.names = ledger(rec) or set()
        if ledger(rec) is None:  # a record written before ledgers: its files by the patterns
            self.names = set(self.artifact_files_by_pattern())
        redone: set[str] = set()
        if same and rec.get("state") == "done":
            changed = self.changed_files(rec.get("files", {}), verify=verify)
            if not changed:
                self.skipped = True
                self.summary = rec.get("summary", {})
                self.digest = self._digest(rec["files"])
                log(f"[{self.name}] up to date, skipped ({self.dir})")
                return self.load()
            self.repaired = [f"{rel} ({why})" for rel, why in changed.items()]
            shown = "; ".join(self.repaired[:3])
            log(f"[{self.name}] {len(changed)} artifact file(s) changed since it finished: {shown}; redoing them")
            redone = set(self.invalidate(list(changed)) or changed)
        elif not same and self.dir.exists():
            log(f"[{self.name}] parameters or inputs changed: recomputing")
            self.clear()
        elif same:
            log(f"[{self.name}] resuming an interrupted run")
        self.dir.mkdir(parents=True, exist_ok=True)
        for stale in self.dir.rglob(f".*{TMP_SUFFIX}"):
            if owns(stale.relative_to(self.dir).as_posix(), self.names):
                stale.unlink()
        self.names |= set(self.planned_files())
        self._write_record("running")
        t0 = time.perf_counter()
        files = self.compute_checked(log, redone)
        self.summary["seconds"] = round(time.perf_counter() - t0, 3)
        if self.repaired:
            self.summary["repaired"] = self.repaired
        self.digest = self._digest(files)
        artifact = self.load()
        self.names = set(files)
        self._write_record("done", summary=self.summary, files=files)
        return artifact

    def compute_checked(self, log, redone: set[str]) -> dict:
        """:meth:`compute`, then :meth:`inconsistent`; units that fail are invalidated and
        computed once more. ``redone``: files rebuilt in this run (hashed from disk). Returns
        the file table; raises :class:`PipelineError` (the record stays ``running``) when the
        artifact is still inconsistent."""
        self.summary = self.compute(log) or {}
        files = self.file_table(fresh=redone)
        bad = self.inconsistent(files)
        if bad:
            shown = "; ".join(f"{rel} ({why})" for rel, why in list(bad.items())[:3])
            log(f"[{self.name}] {len(bad)} artifact file(s) inconsistent: {shown}; redoing them")
            self.repaired += [f"{rel} ({why})" for rel, why in bad.items()]
            redone |= set(self.invalidate(list(bad)) or bad)
            self.summary = self.compute(log) or {}
            files = self.file_table(fresh=redone)
            bad = self.inconsistent(files)
        if bad:
            shown = "; ".join(f"{rel} ({why})" for rel, why in list(bad.items())[:3])
            raise PipelineError(
                f"{self.dir}: the artifact is still inconsistent after redoing it ({shown}); it is not "
                "recorded as finished, so a rerun redoes it; if this repeats, check the inputs and the disk"
            )
        return files

    def artifact_files_by_pattern(self) -> list[str]:
        """Files matching the stage's patterns (the ledger of a record written before ledgers)."""
        return [
            rel
            for rel in folder_files(self.dir)
            if rel != STAGE_FILE and is_owned_file(rel, self.owned) and not is_temporary(rel.rsplit("/", 1)[-1])
        ]

    def _digest(self, files: dict) -> str:
        return json_digest({"fingerprint": self.fingerprint, "files": {rel: v[2] for rel, v in files.items()}})

    def compute(self, log) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def load(self):  # pragma: no cover - abstract
        raise NotImplementedError
