"""LAION-scale selection on one machine: out-of-core SemDeDup -> DBP from fp16 .npy shards.

Per size (each in its own process, so peak RSS is per size): synthetic clustered embeddings
with planted near-duplicates are written to disk (fp16 ``emb_*.npy`` shards + ``meta_*.parquet``
with hex uids, not counted), then :func:`dataprune.outofcore.prune_out_of_core` runs the chain
(k-means on a sample, streamed assignment, cluster-sorted copy, per-cluster SemDeDup, DBP)
under ``--memory-limit``. Printed: each stage's seconds and GFLOP/s against the machine's
``torch.mm`` rate measured in the same run, the GEMM bound of the whole chain, and peak RSS.
At n <= ``--check-up-to`` the in-memory path (:func:`prune_in_memory`, rows loaded whole, a
separate process) must give the identical keep-list, reasons and scores.

``--load`` adds a competing process that keeps one core busy. Per size, SemDeDup's products
on up to 100 median-size clusters are also timed both ways (:func:`compare_schemes`): clusters
side by side on one thread each (now) and clusters in turn with each small product spread
over torch's threads (before), to show what the former buys on a busy machine.
``--eps none`` skips SemDeDup (DBP alone).

Usage: ``python benchmarks/scale.py --n 1000000 3000000 10000000 --d 256``,
``--quick`` (seconds; what the test runs), ``--plot docs/dataprune_scale.png``.
The data goes to ``--workdir`` (default a temporary folder) and is deleted afterwards.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dataprune.outofcore import StageTiming, prune_in_memory, prune_out_of_core  # noqa: E402
from dataprune.semdedup import (  # noqa: E402
    auto_block_size,
    cluster_parallel,
    max_similarity_to_earlier,
    semdedup_flops,
)
from prunecore.cluster import Clustering, l2_normalize  # noqa: E402
from prunecore.layout import ClusterSortedRows, build_cluster_layout  # noqa: E402
from prunecore.memory import parse_size, peak_rss_bytes  # noqa: E402
from prunecore.rows import open_embeddings  # noqa: E402

TEMPERATURE = 0.1


def write_dataset(
    folder: Path, n: int, d: int, *, centres: int, dup_frac: float = 0.05, seed: int = 0, shard_rows: int = 1_000_000
) -> list[Path]:
    """fp16 ``emb_{i}.npy`` (shard_rows, d) + ``meta_{i}.parquet`` (uid) shards; ``dup_frac``
    of each shard's rows are near-copies (noise 0.01) of other rows of it. Returns the .npy paths."""
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((centres, d)).astype(np.float32)
    spread = rng.uniform(0.6, 1.4, centres).astype(np.float32)
    paths = []
    for i, start in enumerate(range(0, n, shard_rows)):
        m = min(shard_rows, n - start)
        path = folder / f"emb_{i:05d}.npy"
        with open(path, "wb") as out:  # plain writes: no mapped pages in this process's RSS
            header = {
                "descr": np.lib.format.dtype_to_descr(np.dtype(np.float16)),
                "fortran_order": False,
                "shape": (m, d),
            }
            np.lib.format.write_array_header_2_0(out, header)
            for s in range(0, m, 50_000):
                b = min(50_000, m - s)
                c = rng.integers(0, centres, b)
                rows = means[c] + spread[c, None] * rng.standard_normal((b, d), dtype=np.float32)
                n_dup = int(dup_frac * b)
                noise = 0.01 * rng.standard_normal((n_dup, d), dtype=np.float32)
                rows[rng.choice(b, n_dup, replace=False)] = rows[rng.integers(0, b, n_dup)] + noise
                out.write(rows.astype(np.float16).tobytes())
        uids = [f"{int(a):016x}{int(b):016x}" for a, b in rng.integers(0, 2**63, (m, 2), dtype=np.uint64)]
        pd.DataFrame({"uid": uids}).to_parquet(folder / f"meta_{i:05d}.parquet")
        paths.append(path)
    return paths


def busy_core(stop) -> None:
    """A competing job: one core spinning until ``stop`` is set."""
    x = 0
    while not stop.is_set():
        for _ in range(100_000):
            x += 1


def compare_schemes(rows, clustering: Clustering, n_clusters: int = 100, max_gflop: float = 30.0) -> dict:
    """SemDeDup's per-cluster products on up to ``n_clusters`` clusters of median size (fewer
    when they would exceed ``max_gflop``), two ways, same rows. ``new_s``: clusters side by
    side, one thread each (what :func:`semdedup` does); ``old_s``: clusters one after
    another, each block product spread over torch's threads (the scheme a descheduled
    thread stalls). Seconds of each, and the GFLOP done."""
    walk = np.lexsort((clustering.sim, clustering.labels))
    bounds = np.searchsorted(clustering.labels[walk], np.arange(clustering.k + 1))
    sizes = np.diff(bounds)
    typical = np.argsort(np.abs(sizes - np.median(sizes)), kind="stable")[:n_clusters]
    work = np.cumsum([semdedup_flops(sizes[[c]], rows.shape[1]) for c in typical]) / 1e9
    typical = typical[: max(2, int(np.searchsorted(work, max_gflop)))]
    clusters = [walk[bounds[c] : bounds[c + 1]] for c in typical if sizes[c] > 1]

    def one(ids):
        x = torch.from_numpy(l2_normalize(np.asarray(rows[ids], dtype=np.float32)))
        return max_similarity_to_earlier(x, auto_block_size(ids.size, None))

    t0 = time.perf_counter()
    old = [one(ids) for ids in clusters]
    old_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    with cluster_parallel(torch.device("cpu")) as run_all:
        new = list(run_all(one, clusters))
    new_s = time.perf_counter() - t0
    del old, new
    flop = semdedup_flops(np.array([ids.size for ids in clusters]), rows.shape[1])
    return {"clusters": len(clusters), "old_s": old_s, "new_s": new_s, "gflop": flop / 1e9}


def run_size(
    n: int,
    d: int,
    k: int,
    *,
    eps: float,
    keep: float,
    memory_limit: str,
    workdir: Path,
    check: bool,
    load: bool,
    seed: int = 0,
) -> dict:
    base_rss = peak_rss_bytes()  # the interpreter with torch, faiss, pandas imported
    folder = workdir / f"n{n}_d{d}"
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    paths = write_dataset(folder, n, d, centres=k, seed=seed)
    generate_s = time.perf_counter() - t0
    stop = multiprocessing.Event()
    competitor = multiprocessing.Process(target=busy_core, args=(stop,), daemon=True) if load else None
    if competitor:
        competitor.start()
    try:
        t0 = time.perf_counter()
        sel, report = prune_out_of_core(
            paths,
            k=k,
            workdir=folder / "work",
            eps=eps,
            method="dbp",
            keep=keep,
            method_params={"temperature": TEMPERATURE},
            memory_limit=memory_limit,
            seed=seed,
            log=lambda line: print(f"{line} (peak RSS {peak_rss_bytes() / 1e9:.2f} GB)", file=sys.stderr, flush=True),
        )
        wall = time.perf_counter() - t0
        peak = peak_rss_bytes()
        clu = report.clustering
        source = open_embeddings(paths, mmap=False)
        if eps is None:  # the chain made no cluster-sorted copy: time the one SemDeDup would need
            t0 = time.perf_counter()
            build_cluster_layout(source, clu.labels, folder / "work" / "layout", memory_limit=parse_size(memory_limit))
            report.stages["cluster-sorted copy"] = StageTiming(time.perf_counter() - t0)
            wall += report.stages["cluster-sorted copy"].seconds
            peak = peak_rss_bytes()
        layout = ClusterSortedRows(folder / "work" / "layout", source, clu.labels)
        schemes = compare_schemes(layout, clu)
    finally:
        if competitor:
            stop.set()
            competitor.join()
    np.save(folder / "keep_ooc.npy", sel.keep)
    result = {
        "n": n,
        "d": d,
        "k": k,
        "load": load,
        "generate_s": generate_s,
        "wall_s": wall,
        "peak_rss_gb": peak / 1e9,
        "import_rss_gb": base_rss / 1e9,
        "memory_limit": memory_limit,
        "mm_gflops": report.mm_gflops,
        "gemm_bound_s": report.gemm_bound_s,
        "kept": sel.n_kept,
        "dropped": sel.reason_counts(),
        "stages": {
            name: {"s": s.seconds, "gflop": s.flop / 1e9, "gflops": s.gflops} for name, s in report.stages.items()
        },
        "schemes": schemes,
        "threads": torch.get_num_threads(),
        "identical": None,
    }
    print(report.table(), file=sys.stderr)
    return result


def in_memory_keep(folder: Path, k: int, eps: float, keep: float, seed: int = 0) -> dict:
    """The in-memory path on the same shards, loaded whole (run in its own process)."""
    x = np.concatenate([np.load(p) for p in sorted(folder.glob("emb_*.npy"))])
    t0 = time.perf_counter()
    sel, _ = prune_in_memory(
        x, k=k, eps=eps, method="dbp", keep=keep, method_params={"temperature": TEMPERATURE}, seed=seed
    )
    wall = time.perf_counter() - t0
    np.save(folder / "keep_mem.npy", sel.keep)
    np.save(folder / "reasons_mem.npy", sel.reasons.astype(str))
    return {"wall_s": wall, "peak_rss_gb": peak_rss_bytes() / 1e9}


def print_table(results: list[dict]) -> None:
    print(
        "\n| n | d | load | wall s | GEMM bound s | bound / wall | peak RSS GB (imports) | limit | kmeans s "
        "| assign s (GFLOP/s) | layout s | SemDeDup s (GFLOP/s) | per-cluster: new vs old scheme s | dbp s "
        "| torch.mm GFLOP/s "
        "| kept | in-memory identical |"
    )
    print("|" + "---|" * 17)
    for r in results:
        st = r["stages"]
        km, asg, lay = st["kmeans (sample)"], st["assign (streamed)"], st["cluster-sorted copy"]
        sd, dbp = st.get("semdedup", {"s": float("nan"), "gflops": float("nan")}), st["dbp"]
        sch = r["schemes"]
        bound = f"{r['gemm_bound_s']:.1f} | {r['gemm_bound_s'] / r['wall_s']:.2f}" if r["gemm_bound_s"] else "- | -"
        old = f"{sch['new_s']:.1f} vs {sch['old_s']:.1f} ({sch['clusters']} clusters)"
        same = {None: "-", True: "yes", False: "NO"}[r["identical"]]
        print(
            f"| {r['n']:,} | {r['d']} | {'1 core busy' if r['load'] else 'none'} | {r['wall_s']:.1f} | "
            f"{bound} | "
            f"{r['peak_rss_gb']:.2f} ({r['import_rss_gb']:.2f}) | "
            f"{r['memory_limit']} | {km['s']:.1f} | {asg['s']:.1f} ({asg['gflops']:.0f}) | {lay['s']:.1f} | "
            f"{sd['s']:.1f} ({sd['gflops']:.0f}) | {old} | {dbp['s']:.1f} | {r['mm_gflops'] or float('nan'):.0f} | "
            f"{r['kept']:,} | {same} |"
        )


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(9, 3.6))
    for d in sorted({r["d"] for r in results}):
        rs = sorted((r for r in results if r["d"] == d and not r["load"]), key=lambda r: r["n"])
        ns = [r["n"] for r in rs]
        ax_t.loglog(ns, [r["wall_s"] for r in rs], "o-", label=f"wall, d={d}")
        bounded = [r for r in rs if r.get("gemm_bound_s")]  # None: rate not measured
        ax_t.loglog([r["n"] for r in bounded], [r["gemm_bound_s"] for r in bounded], "x--", label=f"GEMM bound, d={d}")
        ax_m.loglog(ns, [r["peak_rss_gb"] for r in rs], "o-", label=f"peak RSS, d={d}")
    ax_t.set(xlabel="rows n", ylabel="seconds", title="time (k=1000)")
    ax_m.axhline(4.0, color="grey", linestyle=":", label="target at 1e7 (4 GB)")
    ax_m.set(xlabel="rows n", ylabel="GB", title="peak memory", ylim=(0.5, 16))
    for ax in (ax_t, ax_m):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="*", default=[1_000_000, 3_000_000, 10_000_000])
    parser.add_argument("--d", type=int, nargs="*", default=[256])
    parser.add_argument("--k", type=int, default=1000)
    parser.add_argument("--eps", type=lambda t: None if t == "none" else float(t), default=0.05)
    parser.add_argument("--keep", type=float, default=0.5)
    parser.add_argument("--memory-limit", default="2GB", help="buffers of the out-of-core path (bookkeeping on top)")
    parser.add_argument("--check-up-to", type=int, default=1_000_000, help="compare with the in-memory path up to n")
    parser.add_argument("--load", action="store_true", help="also run each size with one core kept busy")
    parser.add_argument("--workdir", type=Path, help="where the synthetic shards go (deleted afterwards)")
    parser.add_argument("--plot", type=Path, help="write a log-log plot of time and memory vs n")
    parser.add_argument("--json", type=Path, help="append each result as a JSON line here")
    parser.add_argument("--quick", action="store_true", help="n=20000, d=32, k=20, in-process")
    parser.add_argument("--from-json", type=Path, nargs="*", help="only print the table (and --plot) of saved results")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # child process: one size
    parser.add_argument("--in-memory", action="store_true", help=argparse.SUPPRESS)  # child: in-memory path
    args = parser.parse_args(argv)
    if args.from_json:
        results = [json.loads(line) for path in args.from_json for line in path.read_text().splitlines() if line]
        print_table(results)
        if args.plot:
            plot(results, args.plot)
        return results
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="prunekit_scale_"))
    if args.in_memory:
        print(json.dumps(in_memory_keep(workdir / f"n{args.n[0]}_d{args.d[0]}", args.k, args.eps, args.keep)))
        return []
    if args.one or args.quick:
        n, d, k = (20_000, 32, 20) if args.quick else (args.n[0], args.d[0], args.k)
        r = run_size(
            n,
            d,
            k,
            eps=args.eps,
            keep=args.keep,
            memory_limit="4MB" if args.quick else args.memory_limit,
            workdir=workdir,
            check=False,
            load=args.load,
        )
        if args.one:
            print(json.dumps(r))
            return [r]
        folder = workdir / f"n{n}_d{d}"
        in_memory_keep(folder, k, args.eps, args.keep)
        r["identical"] = bool(np.array_equal(np.load(folder / "keep_ooc.npy"), np.load(folder / "keep_mem.npy")))
        shutil.rmtree(workdir, ignore_errors=True)
        print_table([r])
        return [r]
    results = []
    try:
        for d in args.d:
            for n in args.n:
                for load in [False, True] if args.load else [False]:
                    results.append(run_child(args, workdir, n, d, load))
                shutil.rmtree(workdir / f"n{n}_d{d}", ignore_errors=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print_table(results)
    if args.plot:
        plot(results, args.plot)
    return results


def run_child(args, workdir: Path, n: int, d: int, load: bool) -> dict:
    common = [
        "--workdir",
        str(workdir),
        "--n",
        str(n),
        "--d",
        str(d),
        "--k",
        str(args.k),
        "--eps",
        "none" if args.eps is None else str(args.eps),
        "--keep",
        str(args.keep),
    ]
    cmd = [sys.executable, __file__, "--one", "--memory-limit", args.memory_limit, *common] + (
        ["--load"] if load else []
    )
    r = json.loads(subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout.strip().splitlines()[-1])
    if n <= args.check_up_to and not load:
        mem = subprocess.run(
            [sys.executable, __file__, "--in-memory", *common], check=True, stdout=subprocess.PIPE, text=True
        )
        r["in_memory"] = json.loads(mem.stdout.strip().splitlines()[-1])
        folder = workdir / f"n{n}_d{d}"
        r["identical"] = bool(np.array_equal(np.load(folder / "keep_ooc.npy"), np.load(folder / "keep_mem.npy")))
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(r) + "\n")
    print(
        json.dumps({key: r[key] for key in ("n", "d", "load", "wall_s", "peak_rss_gb", "identical")}), file=sys.stderr
    )
    return r


if __name__ == "__main__":
    main()
