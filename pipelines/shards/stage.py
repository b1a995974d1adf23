"""The stage base: fingerprints, skip-if-done, resume, the atomic completion marker.

Every stage has ``params`` (what changes its output) and ``inputs`` (fingerprints of the
upstream artifacts / input files). Its fingerprint is a hash of both. The folder holds
``_stage.json``: ``{"fingerprint", "params", "state": "running"|"done", "summary"}``.

* Same fingerprint and state ``done``: the stage is skipped and its artifact reused.
* Same fingerprint and state ``running`` (a killed run): the stage resumes; embed and write
  keep their finished units (one chunk per input shard; one file per output shard).
* Different fingerprint: the folder is cleared and the stage reruns, which changes its own
  fingerprint and so reruns every stage after it.

All files are written through :mod:`prunecore.io` (temporary name + rename), so a
finished-looking file is a finished file. Inputs are opened read-only and never modified.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from prunecore.io import TMP_SUFFIX, atomic_path, atomic_write_json, json_digest

STAGE_FILE = "_stage.json"
VERSION = 1
STATUS_OK = "ok"
# reasons for samples that never reach the selection methods
MISSING_IMAGE = "missing_image"
UNDECODABLE = "undecodable"
NO_EMBEDDING = "no_embedding"
PARTIAL_SUFFIX = ".partial"  # an output shard being written


class PipelineError(ValueError):
    """A pipeline input problem that stops the run (the message says what and where)."""


def save_npy(path: Path, arr: np.ndarray) -> None:
    """Publish ``arr`` as ``.npy`` atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, arr, allow_pickle=False)


def save_parquet(path: Path, df: pd.DataFrame, metadata: dict | None = None) -> None:
    """Publish ``df`` as parquet atomically; ``metadata`` values go into the schema as JSON."""
    table = pa.Table.from_pandas(df, preserve_index=False)
    if metadata:
        meta = dict(table.schema.metadata or {})
        meta.update({k.encode(): json.dumps(v, default=str).encode() for k, v in metadata.items()})
        table = table.replace_schema_metadata(meta)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def die_hook(stage: str, count: int) -> None:
    """Test hook: ``PRUNEKIT_DIE_AFTER="embed:120"`` SIGKILLs this process once ``stage`` has
    processed ``count`` samples in this process (used by the kill/resume tests)."""
    spec = os.environ.get("PRUNEKIT_DIE_AFTER")
    if not spec:
        return
    name, _, n = spec.partition(":")
    if name == stage and count >= int(n):
        os.kill(os.getpid(), signal.SIGKILL)


class Stage:
    """Base class: fingerprinting, skip-if-done, resume, atomic completion marker.

    Subclasses set ``name`` and implement ``compute(log) -> summary dict`` (writes the
    artifact) and ``load() -> artifact`` (reads it back).
    """

    name = "stage"

    def __init__(self, out: str | os.PathLike, params: dict, inputs: dict):
        self.out = Path(out)
        self.dir = self.out / self.name
        self.params = params
        self.inputs = inputs
        self.fingerprint = json_digest({"stage": self.name, "version": VERSION, "params": params, "inputs": inputs})
        self.skipped = False
        self.summary: dict = {}

    def record(self) -> dict | None:
        path = self.dir / STAGE_FILE
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except ValueError:
            return None

    def is_done(self) -> bool:
        rec = self.record()
        return bool(rec and rec.get("fingerprint") == self.fingerprint and rec.get("state") == "done")

    def _write_record(self, state: str, **extra) -> None:
        rec = {"fingerprint": self.fingerprint, "state": state, "params": self.params, "inputs": self.inputs}
        atomic_write_json(self.dir / STAGE_FILE, {**rec, **extra})

    def run(self, log=print):
        """Run (or skip, or resume) the stage; return its artifact."""
        rec = self.record()
        if self.is_done():
            self.skipped = True
            self.summary = rec.get("summary", {})
            log(f"[{self.name}] up to date, skipped ({self.dir})")
            return self.load()
        if rec is None or rec.get("fingerprint") != self.fingerprint:
            if self.dir.exists():
                log(f"[{self.name}] parameters or inputs changed: recomputing")
                shutil.rmtree(self.dir)
        else:
            log(f"[{self.name}] resuming an interrupted run")
        self.dir.mkdir(parents=True, exist_ok=True)
        for suffix in (TMP_SUFFIX, PARTIAL_SUFFIX):
            for stale in self.dir.rglob(f".*{suffix}"):
                stale.unlink()
        self._write_record("running")
        t0 = time.perf_counter()
        self.summary = self.compute(log) or {}
        self.summary["seconds"] = round(time.perf_counter() - t0, 3)
        self._write_record("done", summary=self.summary)
        return self.load()

    def compute(self, log) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def load(self):  # pragma: no cover - abstract
        raise NotImplementedError
