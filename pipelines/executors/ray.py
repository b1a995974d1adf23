"""The Ray executor (``--backend ray``): embed, SemDeDup scoring and write as Ray Data jobs.

* **embed**: a Ray Data job over the input shards, ``map_batches`` with an actor class: each
  actor loads the encoder once (one per GPU, ``num_gpus=1``) and decodes in its own worker
  processes; one chunk per shard, written by the same function as the local backend, so the
  chunks are the same files.
* **cluster**: k-means runs on the driver on the seeded sample, assignment streams there too
  (faiss on the driver's GPU when there is one).
* **select**: a step that says it runs per cluster (:attr:`Step.runs_per_cluster
  <pipelines.shards.steps.Step.runs_per_cluster>`: SemDeDup with a hard/easy walk, the
  O(m^2 d) part) is a ``groupby("cluster").map_groups(...)`` over clusters; each group reads
  its rows from the embedding memmaps and runs the step on that one cluster, and the step
  merges the groups (:meth:`~pipelines.shards.steps.Step.merge_clusters`), so the decisions
  are the local ones. Other steps need global quantities (quotas, a global ranking) and are
  linear-time: they run on the driver, streaming over the memmaps. The executor never reads
  a step's name.
* **write**: a Ray Data job over output shards; output shard j holds the same samples as in
  the local backend (the plan is computed on the driver), so the output files are the same.

The output folder must be on storage every node sees (NFS, a mounted bucket). Workers
import prunekit: on a cluster install it in the nodes' environment, or let this backend ship
the packages (``py_modules``) when ``address`` is given.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from pipelines.shards.batches import throughput_summary
from pipelines.shards.select import select_chain
from pipelines.shards.steps import build_step
from pipelines.shards.threads import compute_threads
from pipelines.shards.write import write_outputs
from prunecore.cluster import Clustering
from prunecore.rows import ChunkedRows, RowSubset, open_embeddings

_ART_CACHE: dict = {}


def _repo_root() -> str:
    return str(Path(__file__).resolve().parents[2])


class RayExecutor:
    """Connect to (or start) Ray. ``address=None`` starts a local Ray (``num_cpus`` CPUs)
    unless ``RAY_ADDRESS`` is set; ``"auto"`` or ``"ray://host:10001"`` joins a cluster."""

    remote_semdedup = True  # SemDeDup runs in per-cluster tasks: the select stage needs no local copy

    def __init__(self, address: str | None = None, num_cpus: int | None = None, embed_actors: int | None = None):
        import ray

        self.address = address or os.environ.get("RAY_ADDRESS")
        self.embed_actors = embed_actors
        if not ray.is_initialized():
            if self.address:
                import dataprune
                import pipelines
                import prunecore

                runtime_env = {"py_modules": [os.path.dirname(m.__file__) for m in (prunecore, dataprune, pipelines)]}
                ray.init(address=self.address, runtime_env=runtime_env, log_to_driver=False)
            else:
                path = os.pathsep.join(p for p in (_repo_root(), os.environ.get("PYTHONPATH")) if p)
                ray.init(
                    num_cpus=num_cpus,
                    include_dashboard=False,
                    log_to_driver=False,
                    runtime_env={"env_vars": {"PYTHONPATH": path}},
                )

    def __getstate__(self):
        return {"address": self.address, "embed_actors": self.embed_actors}

    # ----------------------------------------------------------------- embed
    def embed(self, stage, todo: list[int]) -> None:
        """Embed input shards ``todo`` in Ray Data actors that each load the encoder once
        (``map_batches`` with a class: ``embed_actors`` of them, ``num_gpus`` each) and decode
        in their own worker processes; each shard's chunk is the same file as locally."""
        import ray
        from tqdm.auto import tqdm

        shipped = copy.copy(stage)
        shipped.executor = None
        gpus = int(ray.cluster_resources().get("GPU", 0))
        actors = self.embed_actors or max(gpus, 1)
        workers = stage.decode.workers
        if workers is None:  # the cluster's cores, one per actor for the encoding process
            workers = max(int(ray.cluster_resources().get("CPU", 1)) // actors - 1, 0)
        ds = ray.data.from_items([{"i": int(i)} for i in todo]).map_batches(
            EmbedActor,
            fn_constructor_args=(shipped, workers),
            batch_size=1,
            batch_format="numpy",
            concurrency=actors,
            num_gpus=1 if gpus else 0,
            num_cpus=1,
        )
        totals = {"images": 0, "wall_s": 0.0, "decode_wait_s": 0.0, "encode_s": 0.0}
        with tqdm(total=len(todo), desc="embed shards (ray)", unit="shard", disable=not stage.progress) as bar:
            for row in ds.iter_rows():
                for name in totals:
                    totals[name] += row[name]
                bar.update(1)
        stage.throughput = throughput_summary(**totals)  # per actor-second

    # ----------------------------------------------------------------- select
    def select(self, embed, clustering, steps, *, device="auto", progress=False):
        import torch

        embed_dir = str(embed.dir)
        threads = torch.get_num_threads()  # the select stage's count (it calls this under it), for the tasks

        def runner(step, rows, clu, texts, device="auto", progress=False):
            unit = build_step(step)
            if unit.runs_per_cluster:
                idx = rows.rows if isinstance(rows, RowSubset) else np.arange(rows.shape[0])
                return ray_per_cluster(embed_dir, step, idx, clu, threads=threads)
            return unit.run(rows, clu, texts, device=device, progress=progress)

        return select_chain(embed, clustering, steps, step_runner=runner)

    # ----------------------------------------------------------------- write
    def write(self, stage, plan: pd.DataFrame, todo: list[int]) -> None:
        import ray
        from tqdm.auto import tqdm

        spec = stage.output.units(stage.dir)
        parts = {int(j): plan[plan["out_shard"] == j] for j in todo}

        def write_task(row):
            j = int(row["j"])
            write_outputs(spec, parts[j], [j], progress=False)
            return {"j": j}

        ds = ray.data.from_items([{"j": int(j)} for j in todo]).map(write_task)
        with tqdm(total=len(todo), desc="write shards (ray)", unit="shard", disable=not stage.progress) as bar:
            for _ in ds.iter_rows():
                bar.update(1)


class EmbedActor:
    """A Ray Data actor: the encoder loaded once, a decode pool of ``workers`` spawned
    processes (they exit with the actor)."""

    def __init__(self, stage, workers: int):
        self.stage = stage
        self.decoder = stage.make_decoder(workers=workers, start_method="spawn")

    def __call__(self, batch: dict) -> dict:
        """Embed input shards ``batch["i"]`` as one stream; one row of timings back."""
        import time

        from pipelines.shards.batches import EmbedTiming

        timing, wait0 = EmbedTiming(), self.decoder.wait_s
        with compute_threads(self.stage.params.get("threads")):  # the driver's count, not Ray's OMP_NUM_THREADS=1
            self.stage.embed_many([int(i) for i in batch["i"]], self.decoder, timing=timing)
        return {
            "images": np.array([timing.images]),
            "wall_s": np.array([time.perf_counter() - timing.start]),
            "decode_wait_s": np.array([self.decoder.wait_s - wait0]),
            "encode_s": np.array([timing.encode_s]),
        }


def _embeddings(embed_dir: str):
    """The image rows of an embed folder, read with ``pread``: only ``embeddings.json`` and
    the row files are opened (not the sample table), once per worker process."""
    if embed_dir not in _ART_CACHE:
        folder = Path(embed_dir)
        index = json.loads((folder / "embeddings.json").read_text())
        paths = [p if os.path.isabs(p) else str(folder / p) for p in index["images"]]
        chunks = [c for c in (open_embeddings(p, mmap=False) for p in paths) if c.shape[0] > 0]
        _ART_CACHE[embed_dir] = chunks[0] if len(chunks) == 1 else ChunkedRows(chunks)
    return _ART_CACHE[embed_dir]


def _cluster_group(group: pd.DataFrame, embed_dir: str, step: dict, threads: int | None = None) -> pd.DataFrame:
    """One cluster: rows (global ids, ascending) -> keep + score of the step run on that
    cluster alone, with torch on ``threads`` CPU threads (the driver's: not the worker's
    OMP_NUM_THREADS=1)."""
    group = group.sort_values("local", kind="stable")
    m = len(group)
    rows = RowSubset(_embeddings(embed_dir), group["row"].to_numpy(np.int64))
    clu = Clustering(
        centroids=np.zeros((1, rows.shape[1]), np.float32),
        labels=np.zeros(m, np.int64),
        sim=group["sim"].to_numpy(np.float32),
    )
    with compute_threads(threads):
        sel = build_step(step).run(rows, clu, None, device="cpu")
    return pd.DataFrame({"local": group["local"].to_numpy(np.int64), "keep": sel.keep, "score": sel.scores})


def ray_per_cluster(embed_dir: str, step: dict, idx: np.ndarray, clustering, *, threads: int | None = None):
    """A per-cluster step over rows ``idx`` (m,) of the embeddings as a Ray groupby over
    clusters, torch on ``threads`` CPU threads in each task (None: the worker's count).
    Returns the same Selection (m,) as the step run locally with that clustering on as many
    threads (the step merges the groups: :meth:`~pipelines.shards.steps.Step.merge_clusters`)."""
    import ray

    m = idx.shape[0]
    df = pd.DataFrame(
        {
            "row": idx.astype(np.int64),
            "local": np.arange(m, dtype=np.int64),
            "cluster": clustering.labels.astype(np.int64),
            "sim": clustering.sim.astype(np.float32),
        }
    )
    ds = (
        ray.data.from_pandas(df)
        .groupby("cluster")
        .map_groups(_cluster_group, fn_args=(embed_dir, step, threads), batch_format="pandas")
    )
    out = ds.to_pandas()
    keep = np.ones(m, dtype=bool)
    scores = np.full(m, np.nan, dtype=np.float32)
    local = out["local"].to_numpy(np.int64)
    keep[local] = out["keep"].to_numpy(bool)
    scores[local] = out["score"].to_numpy(np.float32)
    return build_step(step).merge_clusters(clustering, keep, scores)


def ray_semdedup(embed_dir: str, step: dict, idx: np.ndarray, clustering, *, threads: int | None = None):
    """Deprecated alias of :func:`ray_per_cluster` (kept for one release)."""
    warnings.warn("ray_semdedup is deprecated: use ray_per_cluster", DeprecationWarning, stacklevel=2)
    return ray_per_cluster(embed_dir, step, idx, clustering, threads=threads)
