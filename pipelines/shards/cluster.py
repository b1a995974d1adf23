"""The cluster stage: spherical k-means over the embeddings, every row assigned.

Artifact (``OUT/cluster/``): ``centroids.npy``, ``assign.parquet`` (row, cluster, sim).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from prunecore.cluster import Clustering, kmeans
from prunecore.io import atomic_path
from prunecore.rows import unmapped

from .embed import EmbedArtifact
from .stage import ROW_GROUP_ROWS, PipelineError, Stage, release_scratch, save_npy
from .threads import compute_threads, resolve_threads


@dataclass
class ClusterArtifact:
    """centroids (k, d) f32; labels (n,) i64 and sim (n,) f32 per embedding row."""

    dir: Path
    clustering: Clustering
    fingerprint: str


def save_assignment(path: Path, clu: Clustering, block: int = ROW_GROUP_ROWS) -> None:
    """Publish ``assign.parquet`` (row, cluster, sim; k-means params in the schema) atomically,
    one row group of ``block`` rows at a time (no whole-length temporary)."""
    meta = {b"kmeans": json.dumps(clu.params, default=str).encode()}
    schema = pa.schema([("row", pa.int64()), ("cluster", pa.int64()), ("sim", pa.float32())], metadata=meta)
    n = clu.labels.shape[0]
    with atomic_path(path) as tmp, pq.ParquetWriter(tmp, schema, use_dictionary=["cluster"]) as writer:
        for s in range(0, n, block):
            e = min(s + block, n)
            cols = {"row": np.arange(s, e, dtype=np.int64), "cluster": clu.labels[s:e], "sim": clu.sim[s:e]}
            writer.write_table(pa.table(cols, schema=schema))
    release_scratch()


class ClusterStage(Stage):
    """Spherical k-means on a seeded sample (k * max_points_per_centroid rows), then
    streaming assignment of every row (:func:`prunecore.kmeans`), with torch and faiss on
    ``threads`` CPU threads (a parameter: faiss's centroids depend on it; None: torch's count)."""

    name = "cluster"
    owned = ("centroids.npy", "assign.parquet")

    def __init__(
        self,
        out,
        embed: EmbedArtifact,
        *,
        k: int,
        niter: int = 20,
        seed: int = 1234,
        max_points_per_centroid: int = 256,
        device: str = "auto",
        threads: int | None = None,
    ):
        params = {
            "k": int(k),
            "niter": int(niter),
            "seed": int(seed),
            "max_points_per_centroid": int(max_points_per_centroid),
            "threads": resolve_threads(threads),
        }
        super().__init__(out, params, {"embed": embed.fingerprint})
        self.embed = embed
        self.device = device
        self.computed: Clustering | None = None

    def compute(self, log):
        n = self.embed.n_rows
        if self.params["k"] > n:
            raise PipelineError(f"--clusters {self.params['k']} is more than the {n} embedded samples: lower it")
        log(f"[cluster] k-means k={self.params['k']} on {n:,d} rows")
        with compute_threads(self.params["threads"]):
            clu = kmeans(
                unmapped(self.embed.images),  # read, not mapped: the files' pages stay out of this process
                self.params["k"],
                niter=self.params["niter"],
                seed=self.params["seed"],
                max_points_per_centroid=self.params["max_points_per_centroid"],
                device=self.device,
            )
        save_npy(self.dir / "centroids.npy", clu.centroids)
        save_assignment(self.dir / "assign.parquet", clu)
        sizes = clu.sizes
        self.computed = clu  # load() returns it instead of reading assign.parquet back
        return {
            "k": clu.k,
            "n_train": clu.params["n_train"],
            "empty_clusters": int((sizes == 0).sum()),
            "largest_cluster": int(sizes.max()),
            "median_cluster": float(np.median(sizes)),
        }

    def load(self) -> ClusterArtifact:
        if self.computed is not None:
            clu, self.computed = self.computed, None
            return ClusterArtifact(self.dir, clu, self.digest)
        centroids = np.load(self.dir / "centroids.npy")
        table = pq.read_table(self.dir / "assign.parquet", columns=["cluster", "sim"])
        params = json.loads((table.schema.metadata or {}).get(b"kmeans", b"{}"))
        clu = Clustering(
            centroids=centroids,
            labels=table.column("cluster").to_numpy().astype(np.int64, copy=False),
            sim=table.column("sim").to_numpy().astype(np.float32, copy=False),
            params=params,
        )
        return ClusterArtifact(self.dir, clu, self.digest)
