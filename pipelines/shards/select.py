"""The select stage: the step chain -> a keep-list of every input sample, with its reason.

Artifact (``OUT/select/``): ``keep.parquet`` (key, shard, kept, reason, cluster, score,
...), ``stats_*.parquet`` (per-cluster tables of each step).
"""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from prunecore.cluster import Clustering
from prunecore.layout import build_cluster_layout
from prunecore.memory import default_memory_limit, parse_size, peak_rss_bytes
from prunecore.rows import RowSubset, unmapped

from .cluster import ClusterArtifact
from .embed import EmbedArtifact
from .stage import Stage, read_parquet, save_parquet
from .steps import normalize_steps, recorded_steps, run_step
from .threads import compute_threads, resolve_threads


def subset_rows(rows, idx: np.ndarray):
    """``rows[idx]`` as a lazy view (identity when idx covers every row in order)."""
    if idx.shape[0] == rows.shape[0]:
        return rows
    return RowSubset(rows, idx)


def select_chain(
    embed: EmbedArtifact, clustering: Clustering, steps: list[dict], *, device="auto", progress=False, step_runner=None
):
    """Run the steps in order, each on the survivors of the previous ones; returns the
    composed Selection over all embedding rows and {step name: stats DataFrame}.
    ``step_runner``: replaces :func:`~pipelines.shards.steps.run_step` (an executor's own)."""
    from dataprune import Selection

    n = embed.n_rows
    sel = None  # None: every row still kept (no arrays allocated for it)
    stats = {}
    for i, step in enumerate(steps):
        idx = np.arange(n) if sel is None else sel.indices
        if idx.size == 0:
            break
        whole = idx.size == n  # every row: no subset copies, no lift
        sub_clu = clustering if whole else clustering.subset(idx)
        sub_rows = subset_rows(embed.images, idx)
        sub_txt = subset_rows(embed.texts, idx) if embed.texts is not None else None
        runner = step_runner or run_step
        s = runner(step, sub_rows, sub_clu, sub_txt, device=device, progress=progress)
        for name, df in s.stats.items():
            stats[f"{i}_{name}"] = df
        lifted = s if whole else s.lift(idx, n)
        del s
        sel = lifted if sel is None else sel & lifted
        del lifted
    return (Selection.keep_all(n) if sel is None else sel), stats


@dataclass
class SelectArtifact:
    dir: Path
    keep: pd.DataFrame  # key, shard, kept, reason, cluster, score, row, shard_idx, index
    stats: dict = field(default_factory=dict)
    fingerprint: str = ""


class SelectStage(Stage):
    """Score/select chain -> keep-list parquet (every input sample, with its reason).
    ``executor``: who runs the chain (``None``: :func:`select_chain` in this process).
    ``threads``: torch's CPU threads for the similarities (a parameter: the last bits of a
    SemDeDup score depend on it; None: torch's count); an executor runs its tasks under it.

    ``memory_limit`` (bytes or ``"4GB"``; default half the machine's memory): embeddings
    are read with ``pread`` (never memory-mapped), and when they take more than a quarter of
    the limit a cluster-sorted copy is written to ``layout/`` (in buckets within the limit)
    so each cluster's SemDeDup reads its rows in one contiguous read; the copy is removed
    when the keep-list is written. The limit does not change the result."""

    name = "select"
    owned = ("keep.parquet", "stats_*.parquet", "layout/*")

    def __init__(
        self,
        out,
        embed: EmbedArtifact,
        cluster: ClusterArtifact,
        steps: list[dict],
        *,
        device="auto",
        progress=True,
        executor=None,
        threads: int | None = None,
        memory_limit=None,
    ):
        steps = normalize_steps(steps)
        params = {"steps": recorded_steps(steps), "threads": resolve_threads(threads)}  # renames keep old runs
        super().__init__(out, params, {"embed": embed.fingerprint, "cluster": cluster.fingerprint})
        self.embed, self.cluster, self.steps = embed, cluster, steps
        self.device, self.progress, self.executor = device, progress, executor
        self.memory_limit = default_memory_limit() if memory_limit is None else parse_size(memory_limit)
        self.computed: pd.DataFrame | None = None

    def compute(self, log):
        self.claim(["layout/"])  # the cluster-sorted scratch copy, if one is written
        embed = self.out_of_core_rows(log)
        with compute_threads(self.params["threads"]):
            if self.executor is not None:
                sel, stats = self.executor.select(
                    embed, self.cluster.clustering, self.steps, device=self.device, progress=self.progress
                )
            else:
                sel, stats = select_chain(
                    embed, self.cluster.clustering, self.steps, device=self.device, progress=self.progress
                )
        del embed
        shutil.rmtree(self.dir / "layout", ignore_errors=True)
        log(f"[select] peak RSS {peak_rss_bytes() / 1e9:.2f} GB (memory limit {self.memory_limit / 1e9:.2f} GB)")
        keep = build_keep_list(self.embed.keys, sel, self.cluster.clustering)
        del sel
        self.claim(f"stats_{name}.parquet" for name in stats)
        for name, df in stats.items():
            save_parquet(self.dir / f"stats_{name}.parquet", df.reset_index(drop=True))
        save_parquet(self.dir / "keep.parquet", keep)
        self.computed = keep  # load() returns it: its key/shard/row columns share the sample table's memory
        counts = keep.loc[~keep["kept"], "reason"].value_counts().to_dict()
        return {
            "samples": int(len(keep)),
            "kept": int(keep["kept"].sum()),
            "dropped": {str(k): int(v) for k, v in sorted(counts.items()) if v},
        }

    def out_of_core_rows(self, log) -> EmbedArtifact:
        """The embed artifact with its rows read by ``pread``, and grouped by cluster on disk
        when they take more than a quarter of the memory limit."""
        images = unmapped(self.embed.images)
        texts = unmapped(self.embed.texts) if self.embed.texts is not None else None
        n, d = images.shape
        big = n * d * np.dtype(images.dtype).itemsize > self.memory_limit // 4
        local_semdedup = not getattr(self.executor, "remote_semdedup", False)  # Ray tasks read their own rows
        if big and local_semdedup and any(s["method"] == "semdedup" for s in self.steps):
            log(f"[select] writing a cluster-sorted copy of {n:,} x {d} rows (memory limit {self.memory_limit:,} B)")
            images = build_cluster_layout(
                images, self.cluster.clustering.labels, self.dir / "layout", memory_limit=self.memory_limit
            )
        return dataclasses.replace(self.embed, images=images, texts=texts)

    def load(self) -> SelectArtifact:
        stats = {p.stem[len("stats_") :]: pd.read_parquet(p) for p in sorted(self.dir.glob("stats_*.parquet"))}
        keep = self.computed if self.computed is not None else read_parquet(self.dir / "keep.parquet")
        self.computed = None
        return SelectArtifact(self.dir, keep, stats, self.digest)


def distinct_codes(values: np.ndarray) -> tuple[np.ndarray, list]:
    """(n,) int16 codes and the distinct values of an object array that has few distinct
    values (one mask per value: no hash table, no int64 code per row)."""
    codes = np.zeros(values.shape[0], dtype=np.int16)
    pending = np.ones(values.shape[0], dtype=bool)
    names: list = []
    while pending.any():
        name = values[int(pending.argmax())]
        mask = values == name
        codes[mask] = len(names)
        pending &= ~mask
        names.append(name)
    return codes, names


def reason_column(status: pd.Series, row: np.ndarray | None, reasons: np.ndarray) -> pd.Categorical:
    """Per sample: the selection's reason (``reasons[row]``) where it has an embedding row,
    else its ``status`` (``row=None``: sample i is embedding row i); a categorical with the
    used reasons as sorted categories (small integer codes, no string per row)."""
    codes, names = distinct_codes(reasons)
    if row is not None:
        has = row >= 0
        status = pd.Categorical(status)
        status_codes = status.codes[~has]  # the samples without an embedding (usually few)
        remap = np.full(len(status.categories), -1, dtype=np.int16)
        for c in np.unique(status_codes):
            name = status.categories[c]
            names += [] if name in names else [name]
            remap[c] = names.index(name)
        all_codes = np.empty(row.shape[0], dtype=np.int16)
        all_codes[has] = codes[row[has]]
        all_codes[~has] = remap[status_codes]
        codes = all_codes
    order = sorted(range(len(names)), key=names.__getitem__)
    perm = np.empty(len(names), dtype=np.int16)
    perm[order] = np.arange(len(names), dtype=np.int16)
    return pd.Categorical.from_codes(perm[codes], categories=[names[i] for i in order])


def is_identity(row: np.ndarray, block: int = 1 << 20) -> bool:
    """Whether ``row`` is ``0, 1, ..., n-1`` (checked in blocks: no (n,) temporary)."""
    n = row.shape[0]
    return all(np.array_equal(row[s : s + block], np.arange(s, min(s + block, n))) for s in range(0, n, block))


def build_keep_list(keys: pd.DataFrame, sel, clustering: Clustering) -> pd.DataFrame:
    """One row per input sample (input order): key, shard, kept, reason, cluster, score,
    plus row (embedding row or -1), shard_idx, index and nbytes (for the write stage).

    Per-row memory stays small: key/shard/row/... are the sample table's own columns
    (Arrow strings, categoricals, shared numpy buffers), reason is categorical, and when
    sample i is embedding row i the selection's arrays are used as they are."""
    row = keys["row"].to_numpy(np.int64)
    if is_identity(row) and row.shape[0] == sel.n:
        kept, cluster, score, reason_rows = sel.keep, clustering.labels, sel.scores, None
    else:
        has = row >= 0
        rows = row[has]
        kept = np.zeros(len(keys), dtype=bool)
        cluster = np.full(len(keys), -1, dtype=np.int64)
        score = np.full(len(keys), np.nan, dtype=np.float32)
        kept[has], cluster[has], score[has] = sel.keep[rows], clustering.labels[rows], sel.scores[rows]
        reason_rows = row
    return pd.DataFrame(  # copy=False: the sample table's columns are shared, not copied
        {
            "key": keys["key"],
            "shard": keys["shard"],
            "kept": kept,
            "reason": reason_column(keys["status"], reason_rows, sel.reasons),
            "cluster": cluster,
            "score": score,
            "row": keys["row"],
            "shard_idx": keys["shard_idx"],
            "index": keys["index"],
            "nbytes": keys["nbytes"],
        },
        copy=False,
    )
