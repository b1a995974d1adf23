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

from .select import SelectArtifact
from .stage import PipelineError, Stage, die_hook, save_parquet
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

    def compute(self, log):
        plan = self.plan()
        plan_path = self.dir / "plan.parquet"
        if not plan_path.exists():
            save_parquet(plan_path, plan)
        n_out = int(plan["out_shard"].max()) + 1 if len(plan) else 0
        (self.dir / "done").mkdir(exist_ok=True)
        todo = [j for j in range(n_out) if not (self.dir / "done" / f"{j:06d}.json").exists()]
        if todo and self.executor is not None:
            self.executor.write(self, plan, todo)
        elif todo:
            write_outputs(self, plan, todo, progress=self.progress)
        records = [json.loads((self.dir / "done" / f"{j:06d}.json").read_text()) for j in range(n_out)]
        manifest = {
            "shards": records,
            "samples": int(len(plan)),
            "bytes": int(sum(r["bytes"] for r in records)),
            "max_count": self.params["max_count"],
            "max_size": self.params["max_size"],
        }
        atomic_write_json(self.dir / "manifest.json", manifest)
        return {"output_shards": n_out, "samples": int(len(plan)), "bytes": manifest["bytes"]}

    def done_records(self) -> list[dict]:
        """The ``done/j.json`` records of finished output shards (unreadable ones skipped)."""
        records = []
        for p in sorted((self.dir / "done").glob("*.json")):
            try:
                records.append(json.loads(p.read_text()))
            except ValueError:
                continue
        return records

    def known_digests(self) -> dict[str, str]:
        return {r["file"]: r["sha256"] for r in self.done_records()}

    def invalidate(self, rels: list[str]) -> None:
        """A changed output shard or its done record: delete both, so the shard is rewritten."""
        by_file = {r["file"]: r["index"] for r in self.done_records()}
        for rel in rels:
            if rel in by_file:
                (self.dir / "done" / f"{by_file[rel]:06d}.json").unlink(missing_ok=True)
            elif rel.startswith("done/") and rel[5:-5].isdigit():
                (self.dir / self.out_name(int(rel[5:-5]))).unlink(missing_ok=True)
            (self.dir / rel).unlink(missing_ok=True)

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
                die_hook("write", written)
    unfinished = [j for j, v in remaining.items() if v > 0]
    if unfinished:
        raise PipelineError(
            f"input shards ended before all kept samples were written (output "
            f"shards {unfinished[:5]}): were the shards modified?"
        )
