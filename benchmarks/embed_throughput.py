"""Throughput of the embed stage against its two halves, side by side in one run.

On generated LAION-like shards (real photos — scikit-image's data when installed, else the
photos shipped with scikit-learn and matplotlib — randomly cropped, flipped and resized to
256-640 px, JPEG quality 90), images/s of:

* (a) the pipeline's embed stage (``EmbedStage.run``: tar reading, decode workers, encoder,
  chunk files),
* (b) the encoder alone on ready (prepared uint8) batches,
* (c) decode + preprocess alone with the same decode workers,
* the bound: ``min(b, c)`` where decode and encode have their own hardware (GPU), and
  ``1 / (1/b + 1/c)`` on a CPU where they share the cores; the ratio (a) / bound,
* the old serial path (511e02a: decode, preprocess and encode one after another in one
  process) for the before/after,
* with ``--gpu-decode``: (a) and (c) again with batched torchvision JPEG decoding on the
  encoder's device (nvjpeg on CUDA; ``TorchJpegDecoder``), rows "gpu" in the table.

``--device cuda``: the encoder runs in ``--precision`` on the GPU, every variant is run once
untimed first (warm-up), and the clocks are read after ``torch.cuda.synchronize()``; the bound
is then ``min(b, c)`` (decode on the CPU cores, encode on the GPU). On the CPU (the default) the
bound is ``1 / (1/b + 1/c)`` and nothing is warmed up, as before.

Under load from other processes the wall-clock rates depend on the scheduler's share per
process, so every variant's CPU time (this process + its finished decode workers) is
measured too: (CPU s/image of b + of c) / (CPU s/image of a) is the share of the pipeline's
CPU work that is the two halves' own work (1.0 = no overhead), robust to other load.

Variants run interleaved, ``--rounds`` times, medians reported. Encoders: random-weight
open_clip models (no download): a small ViT and ViT-B-32. Also: how far JPEG draft decoding
moves the embeddings (cosine to the full-decode embedding) and the encoder input pixels.

    PYTHONPATH=. python benchmarks/embed_throughput.py [--images 600] [--rounds 3]
    PYTHONPATH=. python benchmarks/embed_throughput.py --device cuda --precision bf16 --models ViT-B-32 --gpu-decode
    PYTHONPATH=. python benchmarks/embed_throughput.py --quick   # seconds: 24 images, 1 round, small ViT
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import resource
import statistics
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipelines.encoders import OpenClipEncoder
from pipelines.shards.decode import (
    DecodeOptions,
    DecodePool,
    ImageDecoder,
    available_cores,
    decode_image,
    make_decoder,
)
from pipelines.shards.embed import EmbedStage
from pipelines.shards.tario import iter_shard
from prunecore.device import resolve_device
from prunecore.embed import embed_images

SMALL_VIT = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 128, "head_width": 64, "patch_size": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
}


def source_photos() -> list[tuple[str, Image.Image]]:
    """Real photos available offline: scikit-image's data, else scikit-learn's + matplotlib's."""
    try:
        import skimage.data as sd

        names = ["astronaut", "chelsea", "coffee", "rocket", "cat", "hubble_deep_field", "immunohistochemistry"]
        return [(n, Image.fromarray(getattr(sd, n)()).convert("RGB")) for n in names if hasattr(sd, n)]
    except ImportError:
        pass
    photos = []
    import sklearn

    folder = Path(sklearn.__file__).parent / "datasets" / "images"
    photos += [(p.stem, Image.open(p).convert("RGB")) for p in sorted(folder.glob("*.jpg"))]
    try:
        import matplotlib

        hopper = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
        photos.append(("grace_hopper", Image.open(hopper).convert("RGB")))
    except ImportError:
        pass
    if not photos:
        raise SystemExit("no real photos offline: install scikit-image (or scikit-learn / matplotlib)")
    return photos


def laion_like(photos, n: int, seed: int = 0) -> list[bytes]:
    """n JPEGs (q90): random crops (35-100% of a side) of the photos, random flips, resized so
    the longer side is 256-640 px."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img = photos[i % len(photos)][1]
        w, h = img.size
        cw, ch = int(w * rng.uniform(0.35, 1)), int(h * rng.uniform(0.35, 1))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        crop = img.crop((x, y, x + cw, y + ch))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        side = int(rng.integers(256, 641))
        scale = side / max(cw, ch)
        crop = crop.resize((max(int(cw * scale), 1), max(int(ch * scale), 1)), Image.BICUBIC)
        buf = io.BytesIO()
        crop.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def write_shards(folder: Path, jpegs: list[bytes], n_shards: int) -> list[str]:
    paths = []
    per = -(-len(jpegs) // n_shards)
    for s in range(n_shards):
        path = folder / f"{s:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(s * per, min((s + 1) * per, len(jpegs))):
                for ext, data in (("jpg", jpegs[i]), ("txt", f"photo {i}".encode())):
                    info = tarfile.TarInfo(f"{i:08d}.{ext}")
                    info.size, info.mtime = len(data), 1_700_000_000
                    tar.addfile(info, io.BytesIO(data))
        paths.append(str(path))
    return paths


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the decode workers)."""
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + kids.ru_utime + kids.ru_stime


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def synchronizer(device: torch.device):
    """What to call before reading a clock: ``torch.cuda.synchronize`` on CUDA (queued GPU work
    finishes first), nothing on the CPU."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def timed_both(fn, sync=lambda: None) -> tuple[float, float]:
    """(wall seconds, CPU seconds incl. finished child processes) of ``fn()``; ``sync()`` runs
    before both clock readings."""
    sync()
    c0, t0 = cpu_seconds(), time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0, cpu_seconds() - c0


def bound_of(b: float, c: float, device: torch.device) -> float:
    """images/s the embed stage can reach at best: ``min(b, c)`` when encode has its own
    hardware (a GPU) and decode the CPU cores; ``1 / (1/b + 1/c)`` when both share the CPU."""
    return min(b, c) if device.type == "cuda" else 1 / (1 / b + 1 / c)


def bound_rule(device: torch.device) -> str:
    """The formula :func:`bound_of` uses on ``device``, for the printed table."""
    return "min(b,c)" if device.type == "cuda" else "1/(1/b+1/c)"


def run_stage(root: Path, shards, encoder, batch: int, workers: int, draft: float, tag: str, gpu: bool = False) -> None:
    out = root / f"out_{tag}_{time.monotonic_ns()}"
    options = DecodeOptions(workers=workers, draft=draft, gpu=gpu)
    EmbedStage(out, shards, encoder, batch_size=batch, decode=options, progress=False).run(log=lambda *_: None)


def run_encoder(encoder, prepared: list, batch: int) -> None:
    for i in range(0, len(prepared), batch):
        encoder.encode_prepared(prepared[i : i + batch])


def run_decode(decoder: ImageDecoder, items: list, workers: int, batch: int) -> None:
    with DecodePool(decoder, workers) as pool:
        for _ in pool.imap(iter(items), chunk_size=batch):
            pass


def run_gpu_decode(encoder, items: list, draft: float, batch: int) -> None:
    """(c) with ``--gpu-decode``: batched torchvision JPEG decode + resize/crop on the
    encoder's device (the embed stage's ``TorchJpegDecoder``)."""
    with make_decoder(encoder, DecodeOptions(draft=draft, gpu=True)) as decoder:
        for _ in decoder.imap(iter(items), chunk_size=batch):
            pass


def run_old_serial(shards, encoder, batch: int) -> None:
    """The 511e02a embed loop: decode (full), preprocess per image, encode, one process."""
    device = str(encoder.device)
    for shard in shards:
        images = []
        for sample in iter_shard(shard):
            images.append(decode_image(sample.get(("jpg",))[1]))
            if len(images) == batch:
                embed_images(encoder.model, images, encoder.preprocess, batch_size=batch, device=device, progress=False)
                images = []
        if images:
            embed_images(encoder.model, images, encoder.preprocess, batch_size=batch, device=device, progress=False)


def draft_effect(encoder, jpegs: list[bytes], factors=(1.0, 2.0)) -> list[dict]:
    """Cosine of draft-decoded to full-decoded embeddings and mean |pixel difference| of the
    encoder input (0-255), over the images draft decoding changes."""
    full_dec = ImageDecoder.for_encoder(encoder, DecodeOptions(draft=0))
    full = [full_dec(d)[1] for d in jpegs]
    ref = np.concatenate([encoder.encode_prepared(full[i : i + 64]) for i in range(0, len(full), 64)])
    rows = []
    for f in factors:
        dec = ImageDecoder.for_encoder(encoder, DecodeOptions(draft=f))
        prep = [dec(d)[1] for d in jpegs]
        changed = [i for i in range(len(jpegs)) if not np.array_equal(prep[i], full[i])]
        t_full, t_draft = [], []
        for _ in range(3):  # interleaved, medians
            t_full.append(timed(lambda: [full_dec(d) for d in jpegs]))
            t_draft.append(timed(lambda dec=dec: [dec(d) for d in jpegs]))
        speedup = statistics.median(t_full) / statistics.median(t_draft)
        if changed:
            emb = encoder.encode_prepared([prep[i] for i in changed])
            cos = np.sum(emb * ref[changed], axis=1)
            px = [np.abs(prep[i].astype(np.float32) - full[i].astype(np.float32)).mean() for i in changed]
        else:
            cos, px = np.ones(1), [0.0]
        rows.append(
            {
                "draft": f,
                "changed": len(changed),
                "cos_mean": float(cos.mean()),
                "cos_min": float(cos.min()),
                "pixel_mad": float(np.mean(px)),
                "decode_speedup": speedup,
            }
        )
    return rows


def bench_model(name: str, encoder, shards, jpegs, args, root: Path) -> list[dict]:
    batch, n = args.batch_size, len(jpegs)
    encoder._load()  # noqa: SLF001 - load once, outside the timings
    decoder = ImageDecoder.for_encoder(encoder, DecodeOptions(draft=args.draft))
    items = [(str(i), d) for i, d in enumerate(jpegs)]
    prepared = [decoder(d)[1] for d in jpegs]
    configs = [(w, t) for w in args.workers for t in args.threads]
    variants = {}
    for w, t in configs:
        variants[f"a w{w} t{t}"] = (t, lambda w=w: run_stage(root, shards, encoder, batch, w, args.draft, name))
        variants[f"c w{w}"] = (1, lambda w=w: run_decode(decoder, items, w, batch))
    for t in args.threads:
        if args.gpu_decode:
            variants[f"a wgpu t{t}"] = (t, lambda: run_stage(root, shards, encoder, batch, 1, args.draft, name, True))
        variants[f"b t{t}"] = (t, lambda: run_encoder(encoder, prepared, batch))
        variants[f"old t{t}"] = (t, lambda: run_old_serial(shards, encoder, batch))
    if args.gpu_decode:
        variants["c wgpu"] = (1, lambda: run_gpu_decode(encoder, items, args.draft, batch))
    sync = synchronizer(encoder.device)
    if encoder.device.type == "cuda":  # warm-up: CUDA context, cuDNN/cuBLAS plans, nvjpeg handles
        for threads, fn in variants.values():
            torch.set_num_threads(threads)
            timed_both(fn, sync)
    times: dict[str, list[float]] = {k: [] for k in variants}
    cpu: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(args.rounds):
        for key, (threads, fn) in variants.items():
            torch.set_num_threads(threads)
            wall, cpus = timed_both(fn, sync)
            times[key].append(wall)
            cpu[key].append(cpus)
        print(f"  {name} round {r + 1}/{args.rounds} done (load {os.getloadavg()[0]:.1f})", flush=True)
    rate = {k: n / statistics.median(v) for k, v in times.items()}
    per_cpu = {k: statistics.median(v) / n for k, v in cpu.items()}  # CPU seconds per image
    rows = []
    if args.gpu_decode:
        configs += [("gpu", t) for t in args.threads]
    for w, t in configs:
        a, b, c = rate[f"a w{w} t{t}"], rate[f"b t{t}"], rate[f"c w{w}"]
        bound = bound_of(b, c, encoder.device)
        cpu_ratio = (per_cpu[f"b t{t}"] + per_cpu[f"c w{w}"]) / per_cpu[f"a w{w} t{t}"]
        rows.append(
            {
                "model": name,
                "workers": w,
                "threads": t,
                "a": a,
                "b": b,
                "c": c,
                "bound": bound,
                "ratio": a / bound,
                "cpu_ratio": cpu_ratio,
                "old": rate[f"old t{t}"],
                "old_cpu": per_cpu[f"old t{t}"] / per_cpu[f"a w{w} t{t}"],
            }
        )
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=600)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="decode worker counts to measure")
    ap.add_argument("--threads", type=int, nargs="+", default=[1], help="torch thread counts to measure")
    ap.add_argument("--draft", type=float, default=DecodeOptions.draft, help="JPEG draft factor of the runs")
    ap.add_argument("--models", nargs="+", default=["small-vit", "ViT-B-32"])
    ap.add_argument("--device", choices=["cpu", "cuda", "auto"], default="cpu", help="where the encoder runs")
    ap.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default="fp32", help="open_clip precision")
    ap.add_argument("--gpu-decode", action="store_true", help="also (a) and (c) with JPEG decode on --device")
    ap.add_argument("--quick", action="store_true", help="seconds: 24 images, 2 shards, 1 round, small ViT, 1 worker")
    args = ap.parse_args(argv)
    if args.quick:
        args.images, args.shards, args.rounds, args.models, args.workers = 24, 2, 1, ["small-vit"], [1]
    device = resolve_device(args.device)

    load0 = os.getloadavg()
    photos = source_photos()
    jpegs = laion_like(photos, args.images)
    print(
        f"{len(jpegs)} LAION-like JPEGs from {len(photos)} real photos ({', '.join(n for n, _ in photos)}), "
        f"mean {np.mean([len(j) for j in jpegs]) / 1e3:.0f} KB, in {args.shards} shards; "
        f"{available_cores()} cores, {platform.processor() or platform.machine()}, load average {load0[0]:.1f}"
    )
    rows, drafts = [], []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shards = write_shards(root, jpegs, args.shards)
        for model in args.models:
            if model == "small-vit":
                cfg = root / "prunekit-bench-small-vit.json"
                cfg.write_text(json.dumps(SMALL_VIT))
                encoder = OpenClipEncoder(str(cfg), device=str(device), precision=args.precision)
            else:
                encoder = OpenClipEncoder(model, device=str(device), precision=args.precision)
            rows += bench_model(model, encoder, shards, jpegs, args, root)
            torch.set_num_threads(available_cores())
            drafts += [{"model": model, **d} for d in draft_effect(encoder, jpegs[:200])]
    load1 = os.getloadavg()
    print(f"\nload average: {load0[0]:.1f} at start, {load1[0]:.1f} at end (1-minute)")
    on_gpu = device.type == "cuda"
    where = f"{device} ({torch.cuda.get_device_name(device)})" if on_gpu else str(device)
    sharing = "encode on the GPU, decode on the CPU cores" if on_gpu else "decode and encode share the CPU cores"
    print(
        f"\ndevice {where}, precision {args.precision}, batch {args.batch_size}, JPEG draft {args.draft}, "
        f"medians of {args.rounds} interleaved rounds{', after a warm-up round' if on_gpu else ''}, images/s; "
        f"bound = {bound_rule(device)} ({sharing})"
        f"{'; decode workers gpu = batched torchvision JPEG decode on the device' if args.gpu_decode else ''}\n"
    )
    print(
        "| model | decode workers | torch threads | (a) embed stage | (b) encoder alone | (c) decode alone "
        f"| bound {bound_rule(device)} | (a)/bound | (a)/bound, CPU time | old serial | (a)/old | (a)/old, CPU time |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['model']} | {r['workers']} | {r['threads']} | {r['a']:.0f} | {r['b']:.0f} | {r['c']:.0f} "
            f"| {r['bound']:.0f} | {r['ratio']:.2f} | {r['cpu_ratio']:.2f} | {r['old']:.0f} | {r['a'] / r['old']:.2f} "
            f"| {r['old_cpu']:.2f} |"
        )
    print(
        "\n(a)/bound, CPU time = (CPU s per image of b + of c) / (CPU s per image of a): the pipeline's CPU "
        "overhead over its two halves, robust to other load; (a)/old, CPU time likewise against the old path."
    )
    print("\nJPEG draft decoding vs full decode (first 200 images; rows it changes)\n")
    print("| model | draft | images changed | cosine mean | cosine min | input pixel MAD (0-255) | decode speed-up |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for d in drafts:
        print(
            f"| {d['model']} | {d['draft']} | {d['changed']} | {d['cos_mean']:.5f} | {d['cos_min']:.5f} "
            f"| {d['pixel_mad']:.2f} | {d['decode_speedup']:.2f}x |"
        )


if __name__ == "__main__":
    main()
