"""The write stage: kept samples -> output shards (byte-identical members) + manifest.

Artifact (``OUT/write/``): ``shard-000000.tar`` ..., ``plan.parquet``, ``manifest.json``,
``done/{j}.json`` (one per finished output shard).
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
import tempfile
from collections.abc import Sequence
from pathlib import Path

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


class WriteStage(Stage):
    """Kept samples -> output shards (byte-identical members) + manifest.

    The output layout is planned up front from the keep-list (sizes come from the tar
    headers), so output shard j always holds the same samples; each output shard is written
    to a temporary file and renamed, then a small ``done/j.json`` records it. Resume unit:
    one output shard. ``executor``: who writes the pending output shards (``None``:
    :func:`write_outputs` in this process).
    """

    name = "write"
    owned = ("*.tar", "plan.parquet", "manifest.json", "done/*.json")

    def __init__(
        self,
        out,
        select: SelectArtifact,
        shards: list[str],
        *,
        max_count: int = 10000,
        max_size: int = 3_000_000_000,
        prefix: str = "shard",
        progress: bool = True,
        executor=None,
    ):
        params = {"max_count": int(max_count), "max_size": int(max_size), "prefix": prefix}
        super().__init__(out, params, {"select": select.fingerprint, "shards": file_fingerprint(shards)})
        self.select, self.shards = select, list(shards)
        self.progress, self.executor = progress, executor
        self.unit_samples: list[int] = []  # samples per output shard, from the plan (set by compute)

    def out_name(self, j: int) -> str:
        return output_name(self.params["prefix"], j)

    def plan(self) -> pd.DataFrame:
        keep = self.select.keep
        kept = keep[keep["kept"]].sort_values(["shard_idx", "index"], kind="stable")
        if len(kept) and (kept["shard_idx"] < 0).any():
            raise PipelineError(
                "the keep-list has no shard locations (embeddings were ingested "
                "without shards): pass the shards to write filtered copies"
            )
        plan = kept[["key", "shard", "shard_idx", "index"]].copy()
        plan["out_shard"] = np.asarray(
            plan_output_shards(
                kept["nbytes"].to_numpy(), max_count=self.params["max_count"], max_size=self.params["max_size"]
            ),
            dtype=np.int64,
        )
        return plan.reset_index(drop=True)

    def done_name(self, j: int) -> str:
        """The record of output shard ``j`` (relative to the stage folder)."""
        return f"done/{j:06d}.json"

    def compute(self, log):
        plan = self.plan()
        plan_path = self.dir / "plan.parquet"
        if not plan_path.exists():
            save_parquet(plan_path, plan)
        n_out = int(plan["out_shard"].max()) + 1 if len(plan) else 0
        self.unit_samples = np.bincount(plan["out_shard"].to_numpy(), minlength=n_out).tolist()
        self.claim(name for j in range(n_out) for name in (self.out_name(j), self.done_name(j)))
        (self.dir / "done").mkdir(exist_ok=True)
        records = {j: self.unit_record(j) for j in range(n_out)}
        todo = [j for j, rec in records.items() if rec is None]
        self.invalidate([self.done_name(j) for j in todo])  # a half-finished unit: both files go
        if todo and self.executor is not None:
            self.executor.write(self, plan, todo)
        elif todo:
            write_outputs(self, plan, todo, progress=self.progress)
        shards = [records[j] or json.loads((self.dir / self.done_name(j)).read_text()) for j in range(n_out)]
        manifest = {
            "shards": shards,
            "samples": int(len(plan)),
            "bytes": int(sum(r["bytes"] for r in shards)),
            "max_count": self.params["max_count"],
            "max_size": self.params["max_size"],
        }
        atomic_write_json(self.dir / "manifest.json", manifest)
        return {"output_shards": n_out, "samples": int(len(plan)), "bytes": manifest["bytes"]}

    def unit_record(self, j: int) -> dict | None:
        """Output shard ``j``'s ``done`` record when the unit is finished: the record is
        readable, names this shard, and the tar is there with the recorded size; else None."""
        try:
            rec = json.loads((self.dir / self.done_name(j)).read_text())
            finished = rec["index"] == j and rec["file"] == self.out_name(j)
            return rec if finished and (self.dir / rec["file"]).stat().st_size == rec["bytes"] else None
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def done_records(self) -> list[dict]:
        """The readable ``done`` records of the output shards this stage claimed."""
        records = []
        for rel in sorted(n for n in self.names if n.startswith("done/")):
            try:
                rec = json.loads((self.dir / rel).read_text())
            except (OSError, ValueError):
                continue
            if isinstance(rec, dict) and isinstance(rec.get("file"), str):
                records.append(rec)
        return records

    def known_digests(self) -> dict[str, str]:
        return {r["file"]: r["sha256"] for r in self.done_records() if r.get("sha256")}

    def inconsistent(self, files: dict) -> dict[str, str]:
        """Output shards that disagree with their ``done`` record, the manifest or the plan
        (missing, another size or sha256, another number of samples)."""
        manifest = json.loads((self.dir / "manifest.json").read_text())
        bad = {}
        for j, want in enumerate(self.unit_samples):
            name, rec = self.out_name(j), self.unit_record(j)
            listed = manifest["shards"][j] if j < len(manifest["shards"]) else None
            if name not in files or rec is None or rec != listed:
                bad[name] = "missing, or its done record or manifest entry does not match it"
            elif files[name][0] != rec["bytes"] or files[name][2] != rec["sha256"]:
                bad[name] = "size or sha256 differs from its done record"
            elif rec["samples"] != want:
                bad[name] = f"{rec['samples']} samples, the plan puts {want} there"
        return bad

    def invalidate(self, rels: list[str]) -> list[str]:
        """A changed output shard or its done record: delete both, so the shard is rewritten."""
        deleted = []
        for rel in rels:
            unit = [rel]
            if rel.startswith("done/") and rel[5:-5].isdigit():
                unit.append(self.out_name(int(rel[5:-5])))
            elif rel.startswith(self.params["prefix"] + "-") and rel.endswith(".tar"):
                j = rel[len(self.params["prefix"]) + 1 : -4]
                unit += [self.done_name(int(j))] if j.isdigit() else []
            for name in unit:
                if name in self.names:
                    (self.dir / name).unlink(missing_ok=True)
                    deleted.append(name)
        return deleted

    def load(self) -> dict:
        manifest = json.loads((self.dir / "manifest.json").read_text())
        manifest["paths"] = [str(self.dir / r["file"]) for r in manifest["shards"]]
        return manifest


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

    ``stage``: anything with ``dir``, ``shards`` and ``out_name(j)`` (a :class:`WriteStage`)."""
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
