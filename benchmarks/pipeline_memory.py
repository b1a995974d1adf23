"""Bookkeeping memory per row of the shard pipeline on precomputed embeddings.

For each size n, one subprocess writes ``img_emb_0.npy`` (n, d) fp16 + ``metadata_0.parquet``
(keys), then a fresh subprocess imports prunekit (torch, faiss, pyarrow, pandas), records
its peak RSS after the imports (the baseline), runs ``run_filter`` (ingest -> cluster ->
select, DBP) and prints::

    bytes/row = (peak RSS - baseline) / n

The baseline is the peak RSS after the imports and a warm-up run on 10,000 rows in the same
process (which loads the code paths: parquet reader, faiss, thread pools; a fixed cost of
~100-150 MB that is not per row). The peak includes the embedding pages the stages read
through the memmap (2 d bytes/row) and every per-row table (keys, labels, similarities, the
keep-list). Target: <= 100 bytes/row at 1e6 and 1e7 rows.

    python benchmarks/pipeline_memory.py                  # 1e6 and 1e7 rows, d = 8
    python benchmarks/pipeline_memory.py --sizes 1000000 --d 16
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def make_data(folder: Path, n: int, d: int, seed: int = 0) -> None:
    """``img_emb_0.npy`` (n, d) float16 clustered rows and ``metadata_0.parquet`` (key column),
    written in blocks (never all in memory as float32)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((256, d)).astype(np.float32)
    emb = np.lib.format.open_memmap(folder / "img_emb_0.npy", mode="w+", dtype=np.float16, shape=(n, d))
    block = 1 << 20
    for s in range(0, n, block):
        e = min(s + block, n)
        rows = centers[rng.integers(0, len(centers), e - s)] + 0.3 * rng.standard_normal((e - s, d), np.float32)
        emb[s:e] = rows.astype(np.float16)
    emb.flush()
    del emb
    keys = pc.binary_join_element_wise("sample_", pc.cast(pa.array(np.arange(n)), pa.string()), "")
    pq.write_table(pa.table({"key": keys}), folder / "metadata_0.parquet")


def run_once(folder: Path, clusters: int, out: str):
    from pipelines.shards import run_filter

    return run_filter(
        None,
        folder / out,
        embeddings=str(folder / "img_emb_0.npy"),
        metadata=str(folder / "metadata_0.parquet"),
        clusters=clusters,
        steps=[{"method": "dbp", "keep": 0.5, "temperature": 0.5}],
        device="cpu",
        progress=False,
        log=lambda *_: None,
    )


def measure(folder: Path, n: int, clusters: int) -> dict:
    """Run the pipeline on ``folder``'s precomputed rows in this (fresh) process, after a
    warm-up run on ``folder/warm`` (10,000 rows) that loads the code paths once."""
    import faiss  # noqa: F401  (part of the import baseline, as in a real run)
    import pandas  # noqa: F401
    import pyarrow  # noqa: F401
    import torch

    import pipelines.shards  # noqa: F401

    torch.set_num_threads(1)
    imports = peak_rss_bytes()
    run_once(folder / "warm", clusters, "out")
    baseline = peak_rss_bytes()
    t0 = time.perf_counter()
    res = run_once(folder, clusters, "out")
    seconds = time.perf_counter() - t0
    peak = peak_rss_bytes()
    return {
        "n": n,
        "imports_mb": imports / 1e6,
        "baseline_mb": baseline / 1e6,
        "peak_mb": peak / 1e6,
        "bytes_per_row": (peak - baseline) / n,
        "seconds": seconds,
        "kept": int(res.stages["select"].summary["kept"]),
    }


def child(args) -> None:
    if args.make:
        make_data(Path(args.folder), args.n, args.d)
        (Path(args.folder) / "warm").mkdir()
        make_data(Path(args.folder) / "warm", 10_000, args.d, seed=1)
        return
    print(json.dumps(measure(Path(args.folder), args.n, args.clusters)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    p.add_argument("--d", type=int, default=8, help="embedding width (fp16 on disk)")
    p.add_argument("--clusters", type=int, default=100)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--make", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    )
    print("| rows | d | after imports MB | baseline MB | peak RSS MB | bookkeeping bytes/row | seconds | target |")
    print("|---:|---:|---:|---:|---:|---:|---:|---|")
    for n in args.sizes:
        with tempfile.TemporaryDirectory(prefix="prunekit_mem_") as tmp:
            base = [sys.executable, __file__, "--child", "--folder", tmp, "--n", str(n), "--d", str(args.d)]
            subprocess.run(base + ["--make"], env=env, check=True)
            out = subprocess.run(
                base + ["--clusters", str(args.clusters)], env=env, check=True, capture_output=True, text=True
            )
            r = json.loads(out.stdout.strip().splitlines()[-1])
            ok = "met" if r["bytes_per_row"] <= 100 else "NOT met"
            print(
                f"| {n:,} | {args.d} | {r['imports_mb']:.0f} | {r['baseline_mb']:.0f} | {r['peak_mb']:.0f} | "
                f"{r['bytes_per_row']:.1f} | {r['seconds']:.1f} | <= 100 ({ok}) |",
                flush=True,
            )


if __name__ == "__main__":
    main()
