"""Selection from precomputed embeddings larger than memory (one machine).

:func:`prune_out_of_core` runs the chain SemDeDup -> DBP / SSP / random over ``.npy``
files without loading them: k-means trains on a seeded sample, assignment streams the files
in batches (fp16 on disk, converted per batch), a cluster-sorted copy is written once
(:mod:`prunecore.layout`), and each cluster's SemDeDup reads its rows in one contiguous
read. Files are read with ``pread`` (never memory-mapped), so the peak resident set is the
O(n) bookkeeping (labels, similarities, masks: tens of bytes per row) plus O(memory_limit)
buffers. The result is the same :class:`Selection` the in-memory calls give
(:func:`prune_in_memory`): the same sample, batches, rows and per-cluster products.

Each stage's time, floating-point work and GFLOP/s are reported against this machine's
``torch.mm`` rate measured in the same run (before and after the chain; the better).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from prunecore.budget import check_keep
from prunecore.cluster import Clustering, assign, train_centroids
from prunecore.layout import build_cluster_layout
from prunecore.memory import default_memory_limit, parse_size, peak_rss_bytes
from prunecore.rows import RowSubset, as_rows, open_embeddings, unmapped

from .dbp import dbp
from .random_subset import random_subset
from .selection import Selection
from .semdedup import cluster_parallel, semdedup, semdedup_flops
from .ssp import ssp

METHODS = ("dbp", "ssp", "random", None)


@dataclass
class StageTiming:
    """One stage: wall seconds and floating-point operations (0 when not a product)."""

    seconds: float
    flop: float = 0.0
    peak_rss: int = field(default_factory=peak_rss_bytes)  # process peak RSS (bytes) when the stage ended

    @property
    def gflops(self) -> float:
        return self.flop / self.seconds / 1e9 if self.seconds > 0 else 0.0


@dataclass
class ScaleReport:
    """What a run measured: per-stage timings, the machine's ``torch.mm`` GFLOP/s, the
    memory limit and the peak RSS (bytes), rows and kept rows, and the clustering used."""

    stages: dict[str, StageTiming] = field(default_factory=dict)
    mm_gflops: float = 0.0
    memory_limit: int = 0
    peak_rss: int = 0
    n: int = 0
    kept: int = 0
    clustering: Clustering | None = None  # the k-means result the chain used

    @property
    def seconds(self) -> float:
        return sum(s.seconds for s in self.stages.values())

    @property
    def gemm_bound_s(self) -> float:
        """Seconds the products alone would take at the measured ``torch.mm`` rate."""
        return sum(s.flop for s in self.stages.values()) / (self.mm_gflops * 1e9) if self.mm_gflops else 0.0

    def table(self) -> str:
        """Markdown: one line per stage, then the total against the GEMM bound."""
        lines = [
            "| stage | seconds | GFLOP | GFLOP/s | / torch.mm | peak RSS GB after |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for name, s in self.stages.items():
            ratio = f"{s.gflops / self.mm_gflops:.2f}" if s.flop and self.mm_gflops else "-"
            lines.append(
                f"| {name} | {s.seconds:.2f} | {s.flop / 1e9:.1f} | {s.gflops:.1f} | {ratio} | {s.peak_rss / 1e9:.2f} |"
            )
        bound = self.gemm_bound_s
        lines.append(
            f"| total | {self.seconds:.2f} | | | GEMM bound {bound:.2f} s = "
            f"{bound / self.seconds if self.seconds else 0:.2f} of wall |"
        )
        lines.append(
            f"\ntorch.mm {self.mm_gflops:.1f} GFLOP/s; peak RSS {self.peak_rss / 1e9:.2f} GB "
            f"(limit {self.memory_limit / 1e9:.2f} GB); kept {self.kept:,} / {self.n:,}"
        )
        return "\n".join(lines)


def measure_mm_gflops(rows: int, cols: int, d: int, *, seconds: float = 0.3) -> float:
    """GFLOP/s of ``torch.mm`` (rows, d) x (d, cols) in float32: the best of torch's thread
    count and of one thread per core side by side (on a busy machine the first stalls at
    OpenMP barriers; the bound is the better of the two)."""
    a, b = torch.randn(rows, d), torch.randn(d, cols)

    def rate() -> float:
        torch.mm(a, b)
        count, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            torch.mm(a, b)
            count += 1
        return 2.0 * rows * cols * d * count / (time.perf_counter() - t0) / 1e9

    threads = torch.get_num_threads()
    best = rate()
    with cluster_parallel(torch.device("cpu"), threads) as run_all:
        best = max(best, sum(run_all(lambda _: rate(), range(threads))))
    return best


def prune_out_of_core(
    embeddings,
    *,
    keep: float | int = 0.5,
    k: int,
    workdir: str | Path,
    eps: float | None = 0.05,
    method: str | None = "dbp",
    method_params: dict | None = None,
    memory_limit: int | str | None = None,
    niter: int = 20,
    seed: int = 1234,
    max_points_per_centroid: int = 256,
    backend: str = "auto",
    workers: int | None = None,
    log=None,
) -> tuple[Selection, ScaleReport]:
    """SemDeDup (``eps``; None skips it) then ``method`` on the survivors, out of core.

    embeddings: ``.npy`` path(s), a folder of them, or any row source (n, d). ``workdir``:
    where the cluster-sorted copy goes (``workdir/layout``; reused when the labels match).
    ``memory_limit``: bytes or text (``"4GB"``; default half the machine's memory) for the
    buffers (layout buckets, batches); the O(n) bookkeeping comes on top (reported).
    ``keep``: the budget of ``method`` (a fraction of the SemDeDup survivors, or a count),
    checked before any work. ``method_params``: extra keywords of :func:`~dataprune.dbp`
    (``temperature`` required), :func:`~dataprune.ssp` or :func:`~dataprune.random_subset`.
    Returns the Selection over all n rows and a :class:`ScaleReport`.
    """
    limit = default_memory_limit() if memory_limit is None else parse_size(memory_limit)
    check_chain(eps, method, keep)
    rows = as_rows(unmapped(open_embeddings(embeddings, mmap=False)))  # a memmap given is read instead
    n, d = rows.shape
    mm_before = measure_mm_gflops(1024, 1024, d)
    say = log or (lambda _msg: None)
    report = ScaleReport(memory_limit=limit, n=n)
    batch = max(1024, min(65536, limit // 16 // (d * 4)))

    t0 = time.perf_counter()
    centroids, params = train_centroids(
        rows, k, niter=niter, seed=seed, max_points_per_centroid=max_points_per_centroid, backend=backend, device="cpu"
    )
    report.stages["kmeans (sample)"] = StageTiming(time.perf_counter() - t0, 2.0 * params["n_train"] * k * d * niter)
    say(f"[kmeans] {params['n_train']:,} sampled rows, {report.stages['kmeans (sample)'].seconds:.1f} s")
    t0 = time.perf_counter()
    labels, sim = assign(rows, centroids, batch_size=batch, backend=params["backend"], device="cpu")
    report.stages["assign (streamed)"] = StageTiming(time.perf_counter() - t0, 2.0 * n * k * d)
    say(f"[assign] {n:,} rows, {report.stages['assign (streamed)'].seconds:.1f} s")
    clustering = report.clustering = Clustering(centroids, labels, sim, params)

    sorted_rows = rows
    if eps is not None:  # SemDeDup reads cluster by cluster: one contiguous read each
        t0 = time.perf_counter()
        sorted_rows = build_cluster_layout(rows, labels, Path(workdir) / "layout", memory_limit=limit)
        report.stages["cluster-sorted copy"] = StageTiming(time.perf_counter() - t0)
        say(f"[layout] cluster-sorted copy {report.stages['cluster-sorted copy'].seconds:.1f} s")
    sel = run_chain(sorted_rows, clustering, eps, method, keep, method_params, seed, workers, report)
    report.mm_gflops = max(mm_before, measure_mm_gflops(1024, max(1024, int(np.median(clustering.sizes))), d))
    report.peak_rss, report.kept = peak_rss_bytes(), sel.n_kept
    return sel, report


def prune_in_memory(
    embeddings,
    *,
    keep: float | int = 0.5,
    k: int,
    eps: float | None = 0.05,
    method: str | None = "dbp",
    method_params: dict | None = None,
    niter: int = 20,
    seed: int = 1234,
    max_points_per_centroid: int = 256,
    backend: str = "auto",
    workers: int | None = None,
) -> tuple[Selection, ScaleReport]:
    """The same chain as :func:`prune_out_of_core` on rows held in memory (an array (n, d)):
    k-means and assignment on the array, SemDeDup gathering each cluster's rows from it."""
    check_chain(eps, method, keep)
    rows = as_rows(embeddings)
    report = ScaleReport(n=rows.shape[0])
    t0 = time.perf_counter()
    centroids, params = train_centroids(
        rows, k, niter=niter, seed=seed, max_points_per_centroid=max_points_per_centroid, backend=backend, device="cpu"
    )
    batch = 65536
    labels, sim = assign(rows, centroids, batch_size=batch, backend=params["backend"], device="cpu")
    report.stages["kmeans + assign"] = StageTiming(time.perf_counter() - t0)
    clustering = report.clustering = Clustering(centroids, labels, sim, params)
    sel = run_chain(rows, clustering, eps, method, keep, method_params, seed, workers, report)
    report.peak_rss, report.kept = peak_rss_bytes(), sel.n_kept
    return sel, report


def check_chain(eps, method, keep) -> None:
    """Raise before any work for an unknown ``method``, nothing to do, or a bad ``keep``
    (the same error as every method's: :func:`prunecore.budget.check_keep`)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if eps is None and method is None:
        raise ValueError("nothing to do: give eps (SemDeDup) and/or a method")
    check_keep(keep)


def run_chain(rows, clustering, eps, method, keep, method_params, seed, workers, report: ScaleReport) -> Selection:
    """SemDeDup over all rows (when ``eps``), then ``method`` over its survivors; stage
    timings go into ``report``."""
    n, d = rows.shape
    params = dict(method_params or {})
    sel = None
    if eps is not None:
        t0 = time.perf_counter()
        sel = semdedup(rows, eps, clustering=clustering, device="cpu", workers=workers)
        report.stages["semdedup"] = StageTiming(time.perf_counter() - t0, semdedup_flops(clustering.sizes, d))
    if method is None:
        return sel
    survivors = np.arange(n) if sel is None else sel.indices
    sub_rows = rows if survivors.size == n else RowSubset(rows, survivors)
    sub_clu = clustering if survivors.size == n else clustering.subset(survivors)
    t0 = time.perf_counter()
    if method == "dbp":
        if "temperature" not in params:
            raise ValueError("method='dbp' needs method_params={'temperature': ...} (reference code 0.5)")
        step = dbp(sub_rows, keep, clustering=sub_clu, seed=seed, device="cpu", **params)
    elif method == "ssp":
        step = ssp(sub_rows, keep, clustering=sub_clu, seed=seed, **params)
    else:
        step = random_subset(survivors.size, keep, seed=params.get("seed", seed))
    report.stages[method] = StageTiming(time.perf_counter() - t0)
    lifted = step if survivors.size == n else step.lift(survivors, n)
    return lifted if sel is None else sel & lifted
