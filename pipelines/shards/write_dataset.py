"""The write stage's output for a Hugging Face dataset input: the kept rows as a new dataset.

Artifact (``OUT/write/``): ``dataset/`` (a ``save_to_disk`` folder or parquet shards, built
in ``dataset.incomplete/`` and renamed) + ``manifest.json``. The other output (tar shards)
and the stage itself: :mod:`pipelines.shards.write`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from prunecore.io import atomic_path, atomic_write_json, file_digest

from .inputs.dataset import DatasetInput
from .inputs.dataset_load import hf_progress
from .progress import report_progress
from .stage import folder_files, is_temporary, owns
from .tario import plan_output_shards
from .write import WriteStage

OUTPUT_FORMATS = ("disk", "parquet")
WRITE_BATCH_ROWS = 1_000


def output_shard_name(split: str, j: int, n: int) -> str:
    """``train-00000-of-00003.parquet``: the name ``load_dataset(folder)`` reads as split ``train``."""
    return f"{split}-{j:05d}-of-{n:05d}.parquet"


class DatasetOutput:
    """The write stage's output for a dataset input (an
    :class:`~pipelines.shards.write.OutputWriter`): kept rows -> ``OUT/write/dataset``
    (``save_to_disk`` folder or parquet shards), the rows byte-identical to the input's and
    in input order, + ``manifest.json``.

    The dataset is built in ``dataset.incomplete`` and renamed when whole. Parquet shards are
    planned up front (``--shard-max-count`` rows / ``--shard-max-size`` image bytes) and each
    is published atomically, so a killed run keeps its finished shards (resume unit: one
    output shard; a changed or missing shard of a finished dataset is rewritten in place); a
    ``save_to_disk`` folder is one unit, rebuilt whole when any of its files changed. Before
    the stage is recorded done the dataset is read back (:meth:`inconsistent`): every planned
    shard there with its planned rows, the folder loading with as many rows as were kept.
    ``output_format`` None: ``"disk"`` for a map-style dataset, ``"parquet"`` for a stream
    (the only one it can write).
    """

    owned = ("manifest.json", "dataset/*", "dataset.incomplete/*")

    def __init__(
        self,
        source: DatasetInput,
        *,
        output_format: str | None = None,
        max_count: int = 10000,
        max_size: int = 3_000_000_000,
    ):
        output_format = output_format or ("parquet" if source.streaming else "disk")
        if output_format not in OUTPUT_FORMATS:
            raise ValueError(f"output format must be one of {OUTPUT_FORMATS}, got {output_format!r}")
        if output_format == "disk" and source.streaming:
            raise ValueError("a streaming input is written as parquet shards: use --hf-output-format parquet")
        self.params = {"format": output_format, "max_count": int(max_count), "max_size": int(max_size)}
        self.source = source
        self.manifest: dict = {}

    def record_inputs(self) -> dict:
        return {"dataset": self.source.fingerprint()}

    def folders(self, stage: WriteStage) -> tuple[Path, Path]:
        """(the finished dataset's folder, the folder it is built in)."""
        return stage.dir / "dataset", stage.dir / "dataset.incomplete"

    def planned_rows(self, keep: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, int]:
        """(kept row indices in input order, output shard of each, number of output shards)."""
        kept = keep[keep["kept"]].sort_values("index", kind="stable")
        rows = kept["index"].to_numpy(np.int64)
        plan = np.asarray(
            plan_output_shards(
                kept["nbytes"].to_numpy(), max_count=self.params["max_count"], max_size=self.params["max_size"]
            ),
            dtype=np.int64,
        )
        return rows, plan, int(plan.max()) + 1 if plan.size else 1

    def shard_names(self, n_out: int) -> list[str]:
        """The parquet output's file names (inside ``dataset/``)."""
        return [output_shard_name(self.source.split_name, j, n_out) for j in range(n_out)]

    def compute(self, stage: WriteStage) -> dict:
        final, staging = self.folders(stage)
        rows, plan, n_out = self.planned_rows(stage.select.keep)
        if self.params["format"] == "disk":
            if not final.exists():
                folders = {f"{staging.name}/", f"{final.name}/"}
                stage.claim(folders)  # save_to_disk names its files: the folders are claimed while it runs
                if staging.exists():
                    shutil.rmtree(staging)
                with hf_progress(stage.progress):
                    self.source.dataset.select(rows).save_to_disk(str(staging), num_shards=n_out)
                stage.names -= folders  # then exactly the files it wrote
                stage.claim(f"{d}/{rel}" for rel in folder_files(staging) for d in (staging.name, final.name))
                os.replace(staging, final)
        else:
            names = self.shard_names(n_out)
            stage.claim(f"{folder.name}/{name}" for folder in (staging, final) for name in names)
            # a finished dataset missing a shard (repair) gets it back in place; else build, then publish
            target = final if final.exists() else staging
            self.write_parquet(stage, target, rows, plan, n_out)
            if target == staging:
                os.replace(staging, final)
        files = sorted(rel for rel in folder_files(final) if not is_temporary(rel.rsplit("/", 1)[-1]))
        manifest = {
            "format": self.params["format"],
            "dir": final.name,
            "samples": int(rows.size),
            "files": [
                {"file": rel, "bytes": (final / rel).stat().st_size, "sha256": file_digest(final / rel)}
                for rel in files
            ],
        }
        manifest["bytes"] = int(sum(f["bytes"] for f in manifest["files"]))
        atomic_write_json(stage.dir / "manifest.json", manifest)
        self.manifest = manifest
        return {"output_shards": n_out, "samples": int(rows.size), "bytes": manifest["bytes"]}

    def known_digests(self, stage: WriteStage) -> dict[str, str]:
        """The sha256 the manifest took of the dataset's files in this run."""
        final = self.folders(stage)[0]
        return {f"{final.name}/{f['file']}": f["sha256"] for f in self.manifest.get("files", [])}

    def inconsistent(self, stage: WriteStage, files: dict) -> dict[str, str]:
        """Dataset files that do not add up to the kept rows: a planned parquet shard missing,
        unreadable or with other than its planned rows; a ``save_to_disk`` folder that does not
        load or loads with another row count (the whole folder is one unit)."""
        final = self.folders(stage)[0]
        rows, plan, n_out = self.planned_rows(stage.select.keep)
        if self.params["format"] == "disk":
            return self.disk_problems(stage, files, rows.size)
        counts = np.bincount(plan, minlength=n_out) if rows.size else np.zeros(1, np.int64)
        bad = {}
        for name, want in zip(self.shard_names(n_out), counts.tolist()):
            rel = f"{final.name}/{name}"
            try:
                got = pq.read_metadata(stage.dir / rel).num_rows if rel in files else None
            except (OSError, pa.ArrowException) as exc:
                bad[rel] = f"unreadable parquet ({exc})"
                continue
            if got != want:
                bad[rel] = "missing" if got is None else f"{got} rows, {want} planned"
        return bad

    def disk_problems(self, stage: WriteStage, files: dict, n_rows: int) -> dict[str, str]:
        """:meth:`inconsistent` for a ``save_to_disk`` folder: every file of it when it does
        not load with ``n_rows`` rows."""
        final = self.folders(stage)[0]
        import datasets

        try:
            with hf_progress(False):
                got = len(datasets.load_from_disk(str(final), keep_in_memory=False))
            problem = "" if got == n_rows else f"loads {got} rows, {n_rows} kept"
        except Exception as exc:  # noqa: BLE001 - any failure to load means rebuild
            problem = f"does not load ({type(exc).__name__}: {exc})".splitlines()[0]
        if not problem:
            return {}
        prefix = final.name + "/"
        return {rel: problem for rel in files if rel.startswith(prefix)} or {prefix: problem}

    def invalidate(self, stage: WriteStage, rels: list[str]) -> list[str]:
        """Delete the changed files ``rels``; a ``save_to_disk`` folder goes whole (one unit)."""
        final = self.folders(stage)[0]
        prefix = final.name + "/"
        if self.params["format"] == "disk" and any(rel.startswith(prefix) for rel in rels):
            rels = [*rels, *(prefix + rel for rel in folder_files(final))]
        deleted = []
        for rel in dict.fromkeys(rels):
            path = stage.dir / rel
            if owns(rel, stage.names) and path.is_file():
                path.unlink()
                deleted.append(rel)
        if self.params["format"] == "disk" and final.is_dir() and not folder_files(final):
            shutil.rmtree(final)  # only empty folders left: compute builds it again
        return deleted

    def write_parquet(self, stage: WriteStage, staging: Path, rows: np.ndarray, plan: np.ndarray, n_out: int) -> None:
        """Parquet shard j holds ``rows[plan == j]``; finished shards of a killed run are kept."""
        staging.mkdir(exist_ok=True)
        paths = [staging / output_shard_name(self.source.split_name, j, n_out) for j in range(n_out)]
        todo = np.array([not p.exists() for p in paths])
        schema = self.source.schema
        if rows.size == 0:
            with atomic_path(paths[0]) as tmp:
                pq.write_table(schema.empty_table(), tmp)
            return
        written, shard, stack = 0, -1, contextlib.ExitStack()
        with tqdm(total=int(todo[plan].sum()), desc="write", unit="row", disable=not stage.progress) as bar:
            for j, table in self.kept_tables(rows, plan, todo):
                if j != shard:  # output shards come in order: publish the previous one
                    stack.close()
                    stack = contextlib.ExitStack()
                    writer = stack.enter_context(pq.ParquetWriter(stack.enter_context(atomic_path(paths[j])), schema))
                    shard = j
                writer.write_table(table)
                written += table.num_rows
                bar.update(table.num_rows)
                report_progress(stage.name, written)
            stack.close()

    def kept_tables(self, rows: np.ndarray, plan: np.ndarray, todo: np.ndarray) -> Iterator[tuple[int, pa.Table]]:
        """(output shard, Arrow table of its next kept rows) for the shards in ``todo``, in order.
        Map-style: the rows are taken by index; a stream is read once, from the start."""
        wanted = todo[plan]
        if not wanted.any():
            return
        if not self.source.streaming:
            view = self.source.dataset.with_format("arrow")
            for j in np.flatnonzero(todo):
                part = rows[plan == j]
                for lo in range(0, part.size, WRITE_BATCH_ROWS):
                    yield int(j), view[part[lo : lo + WRITE_BATCH_ROWS].tolist()]
            return
        last = int(rows[wanted].max())
        for lo, table in self.source.iter_tables(self.source.schema.names, WRITE_BATCH_ROWS):
            index = np.arange(lo, lo + table.num_rows)
            pos = np.minimum(np.searchsorted(rows, index), rows.size - 1)
            hit = (rows[pos] == index) & wanted[pos]
            shards = plan[pos[hit]]
            local = np.flatnonzero(hit)
            for j in np.unique(shards):
                yield int(j), table.take(local[shards == j])
            if lo + table.num_rows > last:
                return

    def load(self, stage: WriteStage) -> dict:
        """The manifest, with ``path``: the filtered dataset's folder."""
        manifest = json.loads((stage.dir / "manifest.json").read_text())
        manifest["path"] = str(stage.dir / manifest["dir"])
        return manifest
