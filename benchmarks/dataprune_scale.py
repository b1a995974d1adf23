"""Scale benchmark of the dataset-pruning core: kmeans, assign, SemDeDup, DBP.

Synthetic clustered embeddings (d=512, fp16 memmap on disk, planted near-duplicates) at
n = 1e5 and 1e6 (each size in its own process so peak RSS is per size). Per size it prints
stage seconds and peak RSS, and, measured side by side in the same process on the same data:

* SemDeDup GFLOP/s (products actually computed) / GFLOP/s of a plain ``torch.mm`` of the
  typical block shape, measured right before (target >= 0.6);
* naive reference SemDeDup (full m x m matrix per cluster, triu, max, as the reference code)
  time / our time (target >= 1.5x), asserting identical kept rows.

Usage: ``python benchmarks/dataprune_scale.py`` (both sizes), ``--n 100000`` (one size),
``--quick`` (seconds, small shapes; what CI runs).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dataprune  # noqa: E402
from dataprune._clusters import cluster_sorted_order, group_bounds  # noqa: E402
from dataprune.semdedup import _gather_unit_rows, auto_block_size  # noqa: E402
from prunecore import Clustering, RowSubset, assign, train_centroids  # noqa: E402


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def make_embeddings(
    path: Path, n: int, d: int, n_centers: int, dup_frac: float, seed: int, chunk: int = 100_000
) -> np.ndarray:
    """Write (n, d) fp16 rows around ``n_centers`` random centres, with ``dup_frac`` of the
    rows near-copies of earlier rows, chunk by chunk into a .npy memmap."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((n_centers, d)).astype(np.float32)
    spread = rng.uniform(0.6, 1.4, n_centers).astype(np.float32)  # varied cluster density
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(n, d))
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        c = rng.integers(0, n_centers, m)
        rows = centers[c] + spread[c, None] * rng.standard_normal((m, d)).astype(np.float32)
        n_dup = int(dup_frac * m)
        src = rng.integers(0, m, n_dup)
        dst = rng.choice(m, n_dup, replace=False)
        rows[dst] = rows[src] + 0.01 * rng.standard_normal((n_dup, d)).astype(np.float32)
        out[start : start + m] = rows
    out.flush()
    return np.load(path, mmap_mode="r")


def naive_reference_semdedup(emb, clustering: Clustering, eps: float) -> np.ndarray:
    """The reference code's approach: full m x m similarity per cluster, triu, column max."""
    keep = np.ones(emb.shape[0], dtype=bool)
    walk = cluster_sorted_order(clustering.labels, clustering.sim, "hard", 0)
    bounds = group_bounds(clustering.labels[walk], clustering.k)
    for c in range(clustering.k):
        rows = walk[bounds[c] : bounds[c + 1]]
        if rows.size < 2:
            continue
        x = torch.from_numpy(_gather_unit_rows(emb, rows))
        sim = torch.triu(x @ x.T, diagonal=1)
        m = sim.max(dim=0).values
        keep[rows] = (m <= 1 - eps).numpy()
    return keep


def semdedup_flops(sizes: np.ndarray, d: int) -> float:
    """Multiply-adds x2 actually computed by the row-block scheme for these cluster sizes."""
    total = 0.0
    for m in sizes[sizes > 1]:
        b = auto_block_size(int(m), None)
        starts = np.arange(0, m, b)
        ends = np.minimum(starts + b, m)
        total += 2.0 * d * float(((ends - starts) * ends).sum())
    return total


def mm_gflops(rows: int, cols: int, d: int, repeats: int = 20) -> float:
    a = torch.randn(rows, d)
    b = torch.randn(cols, d)
    a @ b.T
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b.T
    return 2.0 * rows * cols * d * repeats / (time.perf_counter() - t0) / 1e9


def run_one(
    n: int, d: int, k: int, eps: float, keep: float, seed: int, device: str = "cpu", compare_backends: bool = True
) -> dict:
    timings = {}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        emb = make_embeddings(Path(tmp) / "emb.npy", n, d, n_centers=k, dup_frac=0.05, seed=seed)
        timings["generate (not counted)"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        centroids, params = train_centroids(emb, k, seed=seed, device=device)  # backend auto
        timings["kmeans"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        labels, sim = assign(emb, centroids, device=device)
        timings["assign"] = time.perf_counter() - t0
        clustering = Clustering(centroids, labels, sim, params)
        if compare_backends:  # the other backend, same sample and seed, side by side
            other = "torch" if params["backend"] == "faiss" else "faiss"
            t0 = time.perf_counter()
            other_centroids, _ = train_centroids(emb, k, seed=seed, backend=other, device=device)
            timings_other = {"backend": other, "kmeans": time.perf_counter() - t0}
            t0 = time.perf_counter()
            assign(emb, other_centroids, backend=other, device=device)
            timings_other["assign"] = time.perf_counter() - t0

        sizes = clustering.sizes
        typical = int(np.median(sizes))
        block = auto_block_size(typical, None)
        machine = mm_gflops(block, typical, d)
        t0 = time.perf_counter()
        dedup = dataprune.semdedup(emb, eps, clustering=clustering, device=device)
        timings["semdedup"] = time.perf_counter() - t0
        ours_gflops = semdedup_flops(sizes, d) / timings["semdedup"] / 1e9

        t0 = time.perf_counter()
        naive_keep = naive_reference_semdedup(emb, clustering, eps)
        naive_s = time.perf_counter() - t0
        assert np.array_equal(naive_keep, dedup.keep), "naive reference and ours disagree"

        t0 = time.perf_counter()
        survivors = dedup.indices
        dbp_sel = dataprune.dbp(
            RowSubset(emb, survivors), keep, clustering=clustering.subset(survivors), temperature=0.1
        )
        timings["dbp"] = time.perf_counter() - t0
        final = dedup & dbp_sel.lift(survivors, n)
    return {
        "n": n,
        "d": d,
        "k": k,
        "timings": timings,
        "total_s": sum(v for key, v in timings.items() if not key.startswith("generate")),
        "peak_rss_gb": peak_rss_gb(),
        "kept": final.n_kept,
        "dropped": final.reason_counts(),
        "median_cluster": typical,
        "largest_cluster": int(sizes.max()),
        "mm_gflops": machine,
        "semdedup_gflops": ours_gflops,
        "naive_s": naive_s,
        "speedup_vs_naive": naive_s / timings["semdedup"],
        "threads": torch.get_num_threads(),
        "device": device,
        "backend": params["backend"],
        "other_backend": timings_other if compare_backends else None,
    }


def print_table(results: list[dict]) -> None:
    print(
        "\n| n | k | kmeans s | assign s | semdedup s | dbp s | total s | peak RSS GB "
        "| SemDeDup GFLOP/s / mm GFLOP/s | naive / ours time | kept |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        t = r["timings"]
        print(
            f"| {r['n']:,} | {r['k']} | {t['kmeans']:.1f} | {t['assign']:.1f} | "
            f"{t['semdedup']:.1f} | {t['dbp']:.1f} | {r['total_s']:.1f} | "
            f"{r['peak_rss_gb']:.2f} | {r['semdedup_gflops']:.0f} / {r['mm_gflops']:.0f} = "
            f"{r['semdedup_gflops'] / r['mm_gflops']:.2f} | {r['speedup_vs_naive']:.2f}x | "
            f"{r['kept']:,} |"
        )
    compared = [r for r in results if r["other_backend"]]
    if compared:
        print("\nk-means backends, same sample, seed and iterations (first = the default):\n")
        print("| n | backend | kmeans s | assign s | other backend | kmeans s | assign s |")
        print("|---|---|---|---|---|---|---|")
        for r in compared:
            t, o = r["timings"], r["other_backend"]
            print(
                f"| {r['n']:,} | {r['backend']} | {t['kmeans']:.1f} | {t['assign']:.1f} | "
                f"{o['backend']} | {o['kmeans']:.1f} | {o['assign']:.1f} |"
            )


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="*", default=[100_000, 1_000_000])
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--k", type=int, default=1000)
    parser.add_argument("--eps", type=float, default=0.05)
    parser.add_argument("--keep", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu (the 2-core target), cuda or auto")
    parser.add_argument("--quick", action="store_true", help="n=20000, d=64, k=50, in-process")
    parser.add_argument("--no-compare", action="store_true", help="skip timing the other k-means/assign backend")
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        results = [run_one(20_000, 64, 50, args.eps, args.keep, args.seed, args.device, not args.no_compare)]
    elif len(args.n) == 1 or args.json:
        results = [
            run_one(n, args.d, args.k, args.eps, args.keep, args.seed, args.device, not args.no_compare) for n in args.n
        ]
    else:  # one process per size so peak RSS is measured per size
        results = []
        for n in args.n:
            cmd = [
                sys.executable,
                __file__,
                "--json",
                "--n",
                str(n),
                "--d",
                str(args.d),
                "--k",
                str(args.k),
                "--eps",
                str(args.eps),
                "--keep",
                str(args.keep),
                "--device",
                args.device,
            ] + (["--no-compare"] if args.no_compare else [])
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            results.append(json.loads(out.strip().splitlines()[-1]))
    if args.json:
        print(json.dumps(results[0]))
    else:
        print_table(results)
    return results


if __name__ == "__main__":
    main()
