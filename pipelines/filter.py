"""The chain runner: embed (or ingest) -> cluster -> select -> write, under one folder.

>>> from pipelines.filter import run_filter
>>> result = run_filter("shards/{00000..00009}.tar", out="out", model="ViT-B-32",
...                     pretrained="/ckpt/vit_b32.pt", clusters=100,
...                     steps=[{"method": "semdedup", "eps": 0.05},
...                            {"method": "dbp", "keep": 0.3, "temperature": 0.5}])
>>> print(result.table())

Output folder::

    OUT/embed/    chunks/{i}.img.npy (+ .txt.npy) + chunks/{i}.keys.parquet per input shard,
                  keys.parquet (every sample, input order), embeddings.json, _stage.json
    OUT/cluster/  centroids.npy, assign.parquet (row, cluster, sim), _stage.json
    OUT/select/   keep.parquet (key, shard, kept, reason, cluster, score, ...),
                  stats_*.parquet (per-cluster tables of each method), _stage.json
    OUT/write/    shard-000000.tar ..., plan.parquet, manifest.json, done/, _stage.json
"""

from __future__ import annotations

import glob
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .shards import expand_shards
from .stages import ClusterStage, EmbedStage, IngestStage, PipelineError, SelectStage, WriteStage


@dataclass
class FilterResult:
    out: Path
    stages: dict = field(default_factory=dict)  # name -> Stage (with .summary, .skipped)
    keep: object = None  # keep-list DataFrame
    manifest: dict | None = None
    seconds: float = 0.0

    def table(self) -> str:
        """Markdown summary: one line per stage, then the drop reasons."""
        lines = ["| stage | status | seconds | result |", "|---|---|---:|---|"]
        for name, st in self.stages.items():
            s = st.summary
            if name == "embed":
                res = (
                    f"{s.get('samples', 0):,} samples, {s.get('embedded', 0):,} embedded, "
                    f"{s.get('missing_image', 0)} missing image, "
                    f"{s.get('undecodable', 0)} undecodable, "
                    f"{len(s.get('corrupt_shards', []))} corrupt shard(s)"
                )
            elif name == "cluster":
                res = (
                    f"k={s.get('k')}, trained on {s.get('n_train', 0):,} rows, "
                    f"largest {s.get('largest_cluster')}, empty {s.get('empty_clusters')}"
                )
            elif name == "select":
                drops = ", ".join(f"{k}: {v:,}" for k, v in s.get("dropped", {}).items())
                res = f"kept {s.get('kept', 0):,} / {s.get('samples', 0):,} ({drops or 'none dropped'})"
            else:
                res = (
                    f"{s.get('samples', 0):,} samples in {s.get('output_shards', 0)} shard(s), "
                    f"{s.get('bytes', 0) / 1e6:.1f} MB"
                )
            status = "skipped (up to date)" if st.skipped else "ran"
            lines.append(f"| {name} | {status} | {s.get('seconds', 0):.2f} | {res} |")
        return "\n".join(lines)


def _natural(path: str):
    """Sort key: ``img_emb_2`` before ``img_emb_10`` (numbers compared as numbers)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path)]


def _glob_files(spec) -> list[str]:
    if spec is None:
        return []
    items = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    out = []
    for item in items:
        item = os.fspath(item)
        if os.path.isdir(item):
            raise ValueError(f"{item} is a folder: give a glob such as {item}/img_emb_*.npy")
        matched = sorted(glob.glob(item), key=_natural) if glob.has_magic(item) else [item]
        for m in matched:
            if not os.path.isfile(m):
                raise FileNotFoundError(f"no file matched {m!r}")
        if not matched:
            raise FileNotFoundError(f"no file matched {item!r}")
        out.extend(matched)
    return out


def default_steps(
    *,
    dedup_eps=None,
    method="dbp",
    keep=0.3,
    temperature=0.5,
    n_neighbors=20,
    balance=0.0,
    order="hard",
    ssp_mode="hard",
    seed=1234,
    clip_score_min=None,
    clip_score_keep=None,
) -> list[dict]:
    """The CLI's chain: [clipscore] -> [semdedup] -> method (dbp/ssp/random/none)."""
    steps = []
    if clip_score_min is not None or clip_score_keep is not None:
        steps.append({"method": "clipscore", "min": clip_score_min, "keep": clip_score_keep})
    if dedup_eps is not None:
        steps.append({"method": "semdedup", "eps": dedup_eps, "order": order})
    if method == "dbp":
        steps.append(
            {
                "method": "dbp",
                "keep": keep,
                "temperature": temperature,
                "n_neighbors": n_neighbors,
                "balance": balance,
                "order": order,
                "seed": seed,
            }
        )
    elif method == "ssp":
        steps.append({"method": "ssp", "keep": keep, "mode": ssp_mode})
    elif method == "random":
        steps.append({"method": "random", "keep": keep, "seed": seed})
    elif method == "semdedup":
        if dedup_eps is None:
            raise ValueError("--method semdedup needs --dedup-eps")
    elif method not in (None, "none"):
        raise ValueError(f"unknown method {method!r}: choose dbp, ssp, random, semdedup or none")
    if not steps:
        raise ValueError("nothing to do: give --dedup-eps and/or a --method")
    return steps


def run_filter(
    shards=None,
    out="prunekit_out",
    *,
    encoder=None,
    model: str | None = None,
    pretrained: str | None = None,
    precision: str = "fp32",
    model_seed: int = 0,
    embeddings=None,
    metadata=None,
    text_embeddings=None,
    key_column: str = "key",
    batch_size: int = 64,
    text: bool | None = None,
    dtype: str = "float16",
    clusters: int = 100,
    kmeans_iter: int = 20,
    max_points_per_centroid: int = 256,
    seed: int = 1234,
    steps: Sequence[dict] | None = None,
    write: bool = True,
    shard_max_count: int = 10000,
    shard_max_size: int = 3_000_000_000,
    strict: bool = False,
    device: str = "auto",
    backend: str = "local",
    ray_address: str | None = None,
    progress: bool = True,
    log=print,
) -> FilterResult:
    """Run the whole chain, skipping finished stages and resuming interrupted ones.

    Embeddings come from ``encoder`` (an object, see :mod:`pipelines.encoders`, or a
    zero-argument factory), or ``model``/``pretrained`` (open_clip name or config .json, or
    ``hf:PATH``), or precomputed ``embeddings`` + ``metadata`` files (globs; one metadata
    parquet with a ``key_column`` per ``.npy``). ``steps``: the selection chain (see
    :func:`default_steps`); each step runs on the survivors of the previous ones and a
    fraction ``keep`` is relative to the rows entering that step.
    """
    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shard_list = expand_shards(shards) if shards is not None else []
    if steps is None:
        steps = default_steps()
    steps = list(steps)
    if text is None:
        text = any(s.get("method") == "clipscore" for s in steps)
    ray_be = None
    if backend == "ray":
        from .ray_backend import RayBackend

        ray_be = RayBackend(address=ray_address)
    elif backend != "local":
        raise ValueError(f"backend must be 'local' or 'ray', got {backend!r}")

    result = FilterResult(out)
    if embeddings is not None:
        emb_stage = IngestStage(
            out,
            _glob_files(embeddings),
            _glob_files(metadata),
            shards=shard_list,
            text_embeddings=_glob_files(text_embeddings),
            key_column=key_column,
            progress=progress,
        )
    else:
        if not shard_list:
            raise ValueError("give shards to embed, or precomputed embeddings")
        if encoder is None:
            if model is None:
                raise ValueError("give an encoder/model to embed with, or precomputed embeddings")
            from .encoders import make_encoder

            enc = make_encoder(model, pretrained, device=device, precision=precision, seed=model_seed)
            encoder = enc
        fingerprint = encoder.fingerprint if hasattr(encoder, "fingerprint") else None
        if fingerprint is None:
            raise ValueError("the encoder (or factory) needs a .fingerprint dict")
        emb_stage = EmbedStage(
            out,
            shard_list,
            encoder,
            encoder_fingerprint=fingerprint,
            batch_size=batch_size,
            text=text,
            dtype=dtype,
            strict=strict,
            progress=progress,
            backend=ray_be,
        )
    embed = emb_stage.run(log)
    result.stages["embed"] = emb_stage
    for err in emb_stage.summary.get("corrupt_shards", []):
        log(f"[embed] WARNING {err}")
    cl_stage = ClusterStage(
        out,
        embed,
        k=clusters,
        niter=kmeans_iter,
        seed=seed,
        max_points_per_centroid=max_points_per_centroid,
        device=device,
    )
    cluster = cl_stage.run(log)
    result.stages["cluster"] = cl_stage
    sel_stage = SelectStage(out, embed, cluster, steps, device=device, progress=progress, backend=ray_be)
    select = sel_stage.run(log)
    result.stages["select"] = sel_stage
    result.keep = select.keep
    if write and shard_list:
        wr_stage = WriteStage(
            out,
            select,
            shard_list,
            max_count=shard_max_count,
            max_size=shard_max_size,
            progress=progress,
            backend=ray_be,
        )
        result.manifest = wr_stage.run(log)
        result.stages["write"] = wr_stage
    result.seconds = time.perf_counter() - t0
    return result


__all__ = ["FilterResult", "PipelineError", "default_steps", "run_filter"]
