"""Throughput of the shard pipeline: embed samples/s, and the pipeline without embedding
(precomputed LAION-style embeddings) at 1e5 and 1e6 rows vs. the core functions called
directly on an in-memory array; peak RSS of each (separate processes).

    python benchmarks/shards_throughput.py            # 1e5 and 1e6 rows, 2000 images
    python benchmarks/shards_throughput.py --quick    # seconds: 1e4 rows, 200 images

Embeddings are synthetic (d=64 fp16, clustered, with 10% planted near-duplicates); images
are generated 64x64 JPEGs. Chain: SemDeDup (eps 0.01) -> DBP (keep 0.5); k = n / 1000.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

D, EPS, KEEP, TEMP = 64, 0.01, 0.5, 0.5
TINY_VIT = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def make_embeddings(folder: Path, n: int, seed: int = 0, chunk: int = 250_000) -> None:
    """img_emb_{i}.npy (fp16) + metadata_{i}.parquet (key) in chunks, memory O(chunk)."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((max(n // 500, 2), D)).astype(np.float32)
    for i, start in enumerate(range(0, n, chunk)):
        m = min(chunk, n - start)
        x = centers[rng.integers(0, len(centers), m)] + 0.6 * rng.standard_normal((m, D))
        dup = rng.random(m) < 0.1
        src = rng.integers(0, m, int(dup.sum()))
        x[dup] = x[src] + 0.005 * rng.standard_normal((int(dup.sum()), D))
        np.save(folder / f"img_emb_{i}.npy", x.astype(np.float16))
        pd.DataFrame({"key": [f"{start + j:09d}" for j in range(m)]}).to_parquet(folder / f"metadata_{i}.parquet")


def child_pipeline(folder: Path, n: int) -> dict:
    from pipelines.shards import run_filter

    t0 = time.perf_counter()
    res = run_filter(
        None,
        folder / "out",
        embeddings=str(folder / "img_emb_*.npy"),
        metadata=str(folder / "metadata_*.parquet"),
        clusters=max(n // 1000, 2),
        steps=[{"method": "semdedup", "eps": EPS}, {"method": "dbp", "keep": KEEP, "temperature": TEMP}],
        device="cpu",
        progress=False,
        log=lambda *_: None,
    )
    return {"seconds": time.perf_counter() - t0, "kept": int(res.keep["kept"].sum()), "rss_mb": peak_rss_mb()}


def child_core(folder: Path, n: int) -> dict:
    from dataprune import dbp, semdedup
    from prunecore import kmeans

    t0 = time.perf_counter()
    x = np.concatenate(
        [np.load(p) for p in sorted(folder.glob("img_emb_*.npy"), key=lambda p: int(p.stem.split("_")[-1]))]
    )
    clu = kmeans(x, max(n // 1000, 2), device="cpu")
    s1 = semdedup(x, EPS, clustering=clu, device="cpu")
    idx = s1.indices
    s2 = dbp(x[idx], KEEP, clustering=clu.subset(idx), temperature=TEMP, device="cpu")
    sel = s1 & s2.lift(idx, x.shape[0])
    return {"seconds": time.perf_counter() - t0, "kept": sel.n_kept, "rss_mb": peak_rss_mb()}


def make_image_shards(folder: Path, n: int, per_shard: int = 500) -> str:
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for s, start in enumerate(range(0, n, per_shard)):
        path = folder / f"img-{s:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(start, min(start + per_shard, n)):
                img = Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).resize((64, 64), Image.BILINEAR)
                buf = io.BytesIO()
                img.save(buf, format="JPEG", quality=90)
                for ext, payload in (("jpg", buf.getvalue()), ("txt", b"a picture")):
                    info = tarfile.TarInfo(f"{i:08d}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        paths.append(str(path))
    return paths


def child_embed(folder: Path, n: int, encoder: str) -> dict:
    from pipelines.encoders import OpenClipEncoder, PixelProjectionEncoder
    from pipelines.shards.embed import EmbedStage

    shards = sorted(str(p) for p in folder.glob("img-*.tar"))
    if encoder == "tiny-vit":
        cfg = folder / "bench-tiny-vit.json"
        cfg.write_text(json.dumps(TINY_VIT))
        enc = OpenClipEncoder(str(cfg), None, device="cpu")
        enc.encode_images([__import__("PIL.Image").Image.new("RGB", (64, 64))])  # load model
    else:
        enc = PixelProjectionEncoder()
    out = folder / f"embed_{encoder}"
    t0 = time.perf_counter()
    EmbedStage(out, shards, enc, batch_size=64, progress=False).run(lambda *_: None)
    return {"seconds": time.perf_counter() - t0, "rss_mb": peak_rss_mb()}


def run_child(*args) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, __file__, "--child", *map(str, args)], env=env, capture_output=True, text=True
    )
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sizes", type=int, nargs="+")
    ap.add_argument("--images", type=int)
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        kind, folder, n = args.child[0], Path(args.child[1]), int(args.child[2])
        if kind == "pipeline":
            out = child_pipeline(folder, n)
        elif kind == "core":
            out = child_core(folder, n)
        else:
            out = child_embed(folder, n, args.child[3])
        print(json.dumps(out))
        return
    sizes = args.sizes or ([10_000] if args.quick else [100_000, 1_000_000])
    n_img = args.images or (200 if args.quick else 2000)
    rows = []
    with tempfile.TemporaryDirectory(prefix="prunekit_bench_") as tmp:
        tmp = Path(tmp)
        img_dir = tmp / "images"
        img_dir.mkdir()
        make_image_shards(img_dir, n_img)
        for enc in ("tiny-vit", "pixel-projection"):
            r = run_child("embed", img_dir, n_img, enc)
            rows.append(
                (
                    f"embed {n_img:,} JPEGs, {enc}",
                    f"{n_img / r['seconds']:,.0f} samples/s",
                    f"{r['seconds']:.1f}",
                    f"{r['rss_mb']:.0f}",
                    "",
                )
            )
        for n in sizes:
            d = tmp / f"emb_{n}"
            d.mkdir()
            make_embeddings(d, n)
            core = run_child("core", d, n)
            pipe = run_child("pipeline", d, n)
            if core["kept"] != pipe["kept"]:
                raise AssertionError(f"pipeline kept {pipe['kept']} but core functions {core['kept']}")
            over = pipe["seconds"] / core["seconds"] - 1
            rows.append(
                (
                    f"core functions, in-memory, n={n:,}",
                    f"{n / core['seconds']:,.0f} rows/s",
                    f"{core['seconds']:.1f}",
                    f"{core['rss_mb']:.0f}",
                    "",
                )
            )
            rows.append(
                (
                    f"pipeline from precomputed .npy, n={n:,}",
                    f"{n / pipe['seconds']:,.0f} rows/s",
                    f"{pipe['seconds']:.1f}",
                    f"{pipe['rss_mb']:.0f}",
                    f"{100 * over:+.1f}% (target < 15%)",
                )
            )
    print(
        f"\nshard pipeline throughput (d={D} fp16, SemDeDup eps={EPS} -> DBP keep={KEEP}, "
        f"k=n/1000; {os.cpu_count()} CPUs)\n"
    )
    print("| run | throughput | seconds | peak RSS MB | pipeline overhead |")
    print("|---|---:|---:|---:|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
