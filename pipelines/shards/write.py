"""The write stage: kept samples -> an output (:class:`OutputWriter`) + manifest.

Outputs: tar shards with byte-identical members (:class:`TarOutput`; artifact ``OUT/write/``:
``shard-000000.tar`` ..., ``plan.parquet``, ``manifest.json``, ``done/{j}.json`` one per
finished output shard), or a Hugging Face dataset
(:class:`~pipelines.shards.write_dataset.DatasetOutput`).
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from prunecore.io import TMP_SUFFIX, atomic_write_json

from .progress import report_progress
from .select import SelectArtifact
from .stage import PipelineError, Stage, save_parquet
from .tario import RawSample, ShardScan, add_sample, file_fingerprint, iter_shard, plan_output_shards


def output_name(prefix: str, j: int) -> str:
    """File name of output shard ``j``."""
    return f"{prefix}-{j:06d}.tar"


class OutputWriter(Protocol):
    """An output of the write stage (tar shards, a Hugging Face dataset): what it writes and
    how its units are checked. Every method gets the :class:`WriteStage` (folder, ledger,
    keep-list, progress, executor)."""

    owned: tuple[str, ...]  # fnmatch patterns of its files in the stage folder
    params: dict  # the stage's ``params`` record

    def record_inputs(self) -> dict:
        """What identifies the input it copies rows from (the stage's ``inputs``, with ``select``)."""

    def compute(self, stage: WriteStage) -> dict:
        """Write the kept samples (resuming a killed run's finished units); the summary."""

    def known_digests(self, stage: WriteStage) -> dict[str, str]:
        """sha256 of the files hashed while writing them."""

    def inconsistent(self, stage: WriteStage, files: dict) -> dict[str, str]:
        """Units that do not add up to the plan (see :meth:`Stage.inconsistent`)."""

    def invalidate(self, stage: WriteStage, rels: list[str]) -> list[str]:
        """Delete the changed files ``rels`` with their units."""

    def load(self, stage: WriteStage) -> dict:
        """The manifest."""


class TarOutput:
    """Kept samples -> output tar shards (byte-identical members) + manifest.

    Files: ``shard-000000.tar`` ..., ``plan.parquet``, ``manifest.json``, ``done/{j}.json``.
    The layout is planned from the keep-list (sizes come from the tar headers), so output
    shard j always holds the same samples; each is written to a temporary file and renamed,
    then a small ``done/j.json`` records it. Resume unit: one output shard.
    """

    owned = ("*.tar", "plan.parquet", "manifest.json", "done/*.json")

    def __init__(
        self, shards: Sequence[str], *, max_count: int = 10000, max_size: int = 3_000_000_000, prefix: str = "shard"
    ):
        self.shards = list(shards)
        self.max_count, self.max_size, self.prefix = int(max_count), int(max_size), prefix
        self.params = {"max_count": self.max_count, "max_size": self.max_size, "prefix": prefix}
        self.unit_samples: list[int] = []  # samples per output shard, from the plan (set by compute)

    def record_inputs(self) -> dict:
        return {"shards": file_fingerprint(self.shards)}

    def out_name(self, j: int) -> str:
        return output_name(self.prefix, j)

    def units(self, stage_dir: Path) -> TarUnits:
        """What a writer of output shards needs (small to ship to a worker)."""
        return TarUnits(stage_dir, self.shards, self.prefix)

    def plan(self, keep: pd.DataFrame) -> pd.DataFrame:
        kept = keep[keep["kept"]].sort_values(["shard_idx", "index"], kind="stable")
        if len(kept) and (kept["shard_idx"] < 0).any():
            raise PipelineError(
                "the keep-list has no shard locations (embeddings were ingested "
                "without shards): pass the shards to write filtered copies"
            )
        plan = kept[["key", "shard", "shard_idx", "index"]].copy()
        plan["out_shard"] = np.asarray(
            plan_output_shards(kept["nbytes"].to_numpy(), max_count=self.max_count, max_size=self.max_size),
            dtype=np.int64,
        )
        return plan.reset_index(drop=True)

    def done_name(self, j: int) -> str:
        """The record of output shard ``j`` (relative to the stage folder)."""
        return f"done/{j:06d}.json"

    def compute(self, stage: WriteStage) -> dict:
        plan = self.plan(stage.select.keep)
        plan_path = stage.dir / "plan.parquet"
        if not plan_path.exists():
            save_parquet(plan_path, plan)
        n_out = int(plan["out_shard"].max()) + 1 if len(plan) else 0
        self.unit_samples = np.bincount(plan["out_shard"].to_numpy(), minlength=n_out).tolist()
        stage.claim(name for j in range(n_out) for name in (self.out_name(j), self.done_name(j)))
        (stage.dir / "done").mkdir(exist_ok=True)
        records = {j: self.unit_record(stage.dir, j) for j in range(n_out)}
        todo = [j for j, rec in records.items() if rec is None]
        self.invalidate(stage, [self.done_name(j) for j in todo])  # a half-finished unit: both files go
        if todo and stage.executor is not None:
            stage.executor.write(stage, plan, todo)
        elif todo:
            write_outputs(self.units(stage.dir), plan, todo, progress=stage.progress)
        shards = [records[j] or json.loads((stage.dir / self.done_name(j)).read_text()) for j in range(n_out)]
        manifest = {
            "shards": shards,
            "samples": int(len(plan)),
            "bytes": int(sum(r["bytes"] for r in shards)),
            "max_count": self.max_count,
            "max_size": self.max_size,
        }
        atomic_write_json(stage.dir / "manifest.json", manifest)
        return {"output_shards": n_out, "samples": int(len(plan)), "bytes": manifest["bytes"]}

    def unit_record(self, stage_dir: Path, j: int) -> dict | None:
        """Output shard ``j``'s ``done`` record when the unit is finished: the record is
        readable, names this shard, and the tar is there with the recorded size; else None."""
        try:
            rec = json.loads((stage_dir / self.done_name(j)).read_text())
            finished = rec["index"] == j and rec["file"] == self.out_name(j)
            return rec if finished and (stage_dir / rec["file"]).stat().st_size == rec["bytes"] else None
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def done_records(self, stage: WriteStage) -> list[dict]:
        """The readable ``done`` records of the output shards the stage claimed."""
        records = []
        for rel in sorted(n for n in stage.names if n.startswith("done/")):
            try:
                rec = json.loads((stage.dir / rel).read_text())
            except (OSError, ValueError):
                continue
            if isinstance(rec, dict) and isinstance(rec.get("file"), str):
                records.append(rec)
        return records

    def known_digests(self, stage: WriteStage) -> dict[str, str]:
        return {r["file"]: r["sha256"] for r in self.done_records(stage) if r.get("sha256")}

    def inconsistent(self, stage: WriteStage, files: dict) -> dict[str, str]:
        """Output shards that disagree with their ``done`` record, the manifest or the plan
        (missing, another size or sha256, another number of samples)."""
        manifest = json.loads((stage.dir / "manifest.json").read_text())
        bad = {}
        for j, want in enumerate(self.unit_samples):
            name, rec = self.out_name(j), self.unit_record(stage.dir, j)
            listed = manifest["shards"][j] if j < len(manifest["shards"]) else None
            if name not in files or rec is None or rec != listed:
                bad[name] = "missing, or its done record or manifest entry does not match it"
            elif files[name][0] != rec["bytes"] or files[name][2] != rec["sha256"]:
                bad[name] = "size or sha256 differs from its done record"
            elif rec["samples"] != want:
                bad[name] = f"{rec['samples']} samples, the plan puts {want} there"
        return bad

    def invalidate(self, stage: WriteStage, rels: list[str]) -> list[str]:
        """A changed output shard or its done record: delete both, so the shard is rewritten."""
        deleted = []
        for rel in rels:
            unit = [rel]
            if rel.startswith("done/") and rel[5:-5].isdigit():
                unit.append(self.out_name(int(rel[5:-5])))
            elif rel.startswith(self.prefix + "-") and rel.endswith(".tar"):
                j = rel[len(self.prefix) + 1 : -4]
                unit += [self.done_name(int(j))] if j.isdigit() else []
            for name in unit:
                if name in stage.names:
                    (stage.dir / name).unlink(missing_ok=True)
                    deleted.append(name)
        return deleted

    def load(self, stage: WriteStage) -> dict:
        manifest = json.loads((stage.dir / "manifest.json").read_text())
        manifest["paths"] = [str(stage.dir / r["file"]) for r in manifest["shards"]]
        return manifest


@dataclass
class TarUnits:
    """What writing output tar shards needs: the stage folder, the input shards, the prefix."""

    dir: Path
    shards: list[str]
    prefix: str

    def out_name(self, j: int) -> str:
        return output_name(self.prefix, j)


class WriteStage(Stage):
    """Kept samples -> the output (``output``: an :class:`OutputWriter`; a list of input
    shards: :class:`TarOutput` over them with ``max_count`` / ``max_size`` / ``prefix``).

    The output layout is planned up front from the keep-list, each unit (output shard) is
    published atomically, so a killed run keeps its finished units. ``executor``: who writes
    the pending tar shards (``None``: :func:`write_outputs` in this process).
    """

    name = "write"
    owned = TarOutput.owned  # the default output's; an instance has its output's

    def __init__(
        self,
        out,
        select: SelectArtifact,
        output: OutputWriter | Sequence[str],
        *,
        max_count: int = 10000,
        max_size: int = 3_000_000_000,
        prefix: str = "shard",
        progress: bool = True,
        executor=None,
    ):
        if not hasattr(output, "compute"):  # paths of the input tar shards
            output = TarOutput(output, max_count=max_count, max_size=max_size, prefix=prefix)
        super().__init__(out, output.params, {"select": select.fingerprint, **output.record_inputs()})
        self.owned = output.owned
        self.select, self.output = select, output
        self.progress, self.executor = progress, executor

    def compute(self, log):
        return self.output.compute(self)

    def known_digests(self) -> dict[str, str]:
        return self.output.known_digests(self)

    def inconsistent(self, files: dict) -> dict[str, str]:
        return self.output.inconsistent(self, files)

    def invalidate(self, rels: list[str]) -> list[str]:
        return self.output.invalidate(self, rels)

    def load(self) -> dict:
        return self.output.load(self)


class HashingFile:
    """Write-only file wrapper that hashes what goes through it."""

    def __init__(self, fh):
        self.fh, self.sha, self.n = fh, hashlib.sha256(), 0

    def write(self, data):
        self.sha.update(data)
        self.n += len(data)
        return self.fh.write(data)

    def tell(self):
        return self.n

    def flush(self):
        self.fh.flush()


class OutputShard:
    """One output tar being written under a temporary name; ``close()`` renames it and
    records ``done/j.json`` (file, samples, bytes, sha256)."""

    def __init__(self, stage_dir: Path, j: int, name: str):
        self.stage_dir, self.j, self.name = stage_dir, j, name
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=TMP_SUFFIX, dir=stage_dir)
        self.tmp = Path(tmp)  # unique per process: concurrent writers never share a name
        self.fh = os.fdopen(fd, "wb")
        self.hf = HashingFile(self.fh)
        self.tar = tarfile.open(fileobj=self.hf, mode="w", format=tarfile.PAX_FORMAT)
        self.count = 0

    def add(self, sample: RawSample) -> None:
        add_sample(self.tar, sample)
        self.count += 1

    def close(self) -> dict:
        self.tar.close()
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()
        os.chmod(self.tmp, 0o644)
        os.replace(self.tmp, self.stage_dir / self.name)
        rec = {
            "index": self.j,
            "file": self.name,
            "samples": self.count,
            "bytes": self.hf.n,
            "sha256": self.hf.sha.hexdigest(),
        }
        atomic_write_json(self.stage_dir / "done" / f"{self.j:06d}.json", rec)
        return rec


def write_outputs(stage, plan: pd.DataFrame, todo: Sequence[int], *, progress=True) -> None:
    """Write output shards ``todo`` in one pass over the input shards they need.

    ``stage``: anything with ``dir``, ``shards`` and ``out_name(j)`` (a :class:`TarUnits`)."""
    todo_set = set(int(j) for j in todo)
    part = plan[plan["out_shard"].isin(todo_set)]
    want = {
        (int(s), int(i)): (int(j), key)
        for key, s, i, j in part[["key", "shard_idx", "index", "out_shard"]].itertuples(index=False)
    }
    remaining = part["out_shard"].value_counts().to_dict()
    open_shards: dict[int, OutputShard] = {}
    written = 0
    bar = tqdm(total=len(part), desc="write", unit="img", disable=not progress)
    with bar:
        for s in sorted(part["shard_idx"].unique().tolist()):
            shard = stage.shards[s]
            scan = ShardScan(shard)
            for sample in iter_shard(shard, scan):
                hit = want.get((s, sample.index))
                if hit is None:
                    continue
                j, key = hit
                if sample.key != key:
                    raise PipelineError(
                        f"{shard} changed since it was embedded: sample {sample.index} is {sample.key!r}"
                    )
                if j not in open_shards:
                    open_shards[j] = OutputShard(stage.dir, j, stage.out_name(j))
                open_shards[j].add(sample)
                remaining[j] -= 1
                written += 1
                bar.update(1)
                if remaining[j] == 0:
                    open_shards.pop(j).close()
                report_progress("write", written)
    unfinished = [j for j, v in remaining.items() if v > 0]
    if unfinished:
        raise PipelineError(
            f"input shards ended before all kept samples were written (output "
            f"shards {unfinished[:5]}): were the shards modified?"
        )
