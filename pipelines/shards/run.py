"""The chain runner: embed (or ingest) -> cluster -> select -> write, under one folder.

>>> from pipelines.shards import run_filter
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from .cluster import ClusterStage
from .embed import EmbedStage
from .ingest import IngestStage
from .select import SelectStage
from .stage import PipelineError
from .steps import STEPS
from .tario import expand_shards
from .write import WriteStage


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
    clip_score_min=None,
    clip_score_keep=None,
    **params,
) -> list[dict]:
    """The CLI's chain: [clipscore] -> [semdedup] -> method (dbp/ssp/random/none).

    ``params``: parameters of the method step (``keep``, ``temperature``, ``seed``...; see
    :mod:`pipelines.shards.steps`); ``None`` or a parameter the method does not have is
    left out, so the step's own default applies. ``order`` also sets SemDeDup's walk order;
    ``ssp_mode`` is SSP's ``mode``.
    """
    known = {"ssp_mode"}.union(*(cls.defaults() for cls in STEPS.values()))
    if set(params) - known:
        raise TypeError(f"unknown step parameter(s) {sorted(set(params) - known)}; known: {sorted(known)}")
    params = {k: v for k, v in params.items() if v is not None}
    if "ssp_mode" in params:
        params["mode"] = params.pop("ssp_mode")
    steps = []
    if clip_score_min is not None or clip_score_keep is not None:
        steps.append({"method": "clipscore", "min": clip_score_min, "keep": clip_score_keep})
    if dedup_eps is not None:
        steps.append({"method": "semdedup", "eps": dedup_eps, **_known("semdedup", params, ("order",))})
    if method in ("dbp", "ssp", "random"):
        steps.append({"method": method, **_known(method, params)})
    elif method == "semdedup":
        if dedup_eps is None:
            raise ValueError("--method semdedup needs --dedup-eps")
    elif method not in (None, "none"):
        raise ValueError(f"unknown method {method!r}: choose dbp, ssp, random, semdedup or none")
    if not steps:
        raise ValueError("nothing to do: give --dedup-eps and/or a --method")
    return steps


def _known(method: str, params: dict, names: Sequence[str] | None = None) -> dict:
    """The entries of ``params`` that step ``method`` has (restricted to ``names`` if given)."""
    allowed = set(STEPS[method].defaults()) & set(params) & set(params if names is None else names)
    return {k: params[k] for k in sorted(allowed)}


@dataclass
class FilterConfig:
    """Every option of :func:`run_filter` (the CLI's flags), with its default.

    Embedding source: ``encoder`` (an object, see :mod:`pipelines.encoders`, or a
    zero-argument factory), or ``model``/``pretrained`` (open_clip name or config .json, or
    ``hf:PATH``), or precomputed ``embeddings`` + ``metadata`` files (globs; one metadata
    parquet with a ``key_column`` per ``.npy``). ``steps``: the selection chain (see
    :func:`default_steps`); each step runs on the survivors of the previous ones and a
    fraction ``keep`` is relative to the rows entering that step.
    """

    # embedding
    encoder: object = None
    model: str | None = None
    pretrained: str | None = None
    precision: str = "fp32"
    model_seed: int = 0
    embeddings: object = None
    metadata: object = None
    text_embeddings: object = None
    key_column: str = "key"
    batch_size: int = 64
    text: bool | None = None  # embed captions (default: when a clipscore step asks)
    dtype: str = "float16"
    strict: bool = False
    # clustering
    clusters: int = 100
    kmeans_iter: int = 20
    max_points_per_centroid: int = 256
    seed: int = 1234
    # selection
    steps: Sequence[dict] | None = None  # None: default_steps()
    # output shards
    write: bool = True
    shard_max_count: int = 10000
    shard_max_size: int = 3_000_000_000
    # Hugging Face dataset / parquet input (pipelines/datasets.py): a local path or a Dataset
    hf_dataset: object = None
    split: str | None = None
    image_column: str = "image"
    text_column: str | None = None
    embedding_column: str | None = None
    id_column: str | None = None
    streaming: bool = False  # read the dataset as a stream (IterableDataset)
    chunk_rows: int = 10_000  # rows per resume unit of the embed stage
    hf_output_format: str | None = None  # "disk" (save_to_disk) or "parquet" (shards; streams)
    hf_cache_dir: str | None = None  # load_dataset's Arrow cache
    # execution
    device: str = "auto"
    backend: str = "local"
    ray_address: str | None = None
    progress: bool = True
    log: Callable = print


def filter_config(config: FilterConfig | None = None, **options) -> FilterConfig:
    """``config`` (or the defaults) with ``options`` replaced; unknown names raise TypeError."""
    names = {f.name for f in fields(FilterConfig)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise TypeError(f"unknown run_filter option(s) {unknown}; FilterConfig has {sorted(names)}")
    return replace(config or FilterConfig(), **options)


def make_executor(backend: str, ray_address: str | None = None):
    """``"local"`` -> :class:`~pipelines.executors.local.LocalExecutor`, ``"ray"`` -> RayExecutor."""
    if backend == "ray":
        from pipelines.executors.ray import RayExecutor

        return RayExecutor(address=ray_address)
    if backend == "local":
        from pipelines.executors.local import LocalExecutor

        return LocalExecutor()
    raise ValueError(f"backend must be 'local' or 'ray', got {backend!r}")


def run_filter(shards=None, out="prunekit_out", config: FilterConfig | None = None, **options) -> FilterResult:
    """Run the whole chain, skipping finished stages and resuming interrupted ones.

    ``config``: a :class:`FilterConfig`; ``options``: any of its fields as keywords
    (``run_filter(shards, out, clusters=50, steps=[...])``), applied on top of ``config``.
    """
    cfg = filter_config(config, **options)
    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shard_list = expand_shards(shards) if shards is not None else []
    steps = list(default_steps() if cfg.steps is None else cfg.steps)
    text = any(s.get("method") == "clipscore" for s in steps) if cfg.text is None else cfg.text
    executor = make_executor(cfg.backend, cfg.ray_address)
    log, progress = cfg.log, cfg.progress

    result = FilterResult(out)
    dataset = None
    if cfg.hf_dataset is not None:
        from pipelines.datasets import dataset_embed_stage

        if shard_list or cfg.embeddings is not None:
            raise ValueError("give either shards / precomputed embeddings or a Hugging Face dataset, not both")
        encoder = None if cfg.embedding_column else _encoder(cfg, [cfg.hf_dataset])
        dataset, emb_stage = dataset_embed_stage(out, cfg, encoder, text=text, executor=executor)
    elif cfg.embeddings is not None:
        emb_stage = IngestStage(
            out,
            _glob_files(cfg.embeddings),
            _glob_files(cfg.metadata),
            shards=shard_list,
            text_embeddings=_glob_files(cfg.text_embeddings),
            key_column=cfg.key_column,
            progress=progress,
        )
    else:
        emb_stage = EmbedStage(
            out,
            shard_list,
            _encoder(cfg, shard_list),
            batch_size=cfg.batch_size,
            text=text,
            dtype=cfg.dtype,
            strict=cfg.strict,
            progress=progress,
            executor=executor,
        )
    embed = emb_stage.run(log)
    result.stages["embed"] = emb_stage
    for err in emb_stage.summary.get("corrupt_shards", []):
        log(f"[embed] WARNING {err}")
    cl_stage = ClusterStage(
        out,
        embed,
        k=cfg.clusters,
        niter=cfg.kmeans_iter,
        seed=cfg.seed,
        max_points_per_centroid=cfg.max_points_per_centroid,
        device=cfg.device,
    )
    cluster = cl_stage.run(log)
    result.stages["cluster"] = cl_stage
    sel_stage = SelectStage(out, embed, cluster, steps, device=cfg.device, progress=progress, executor=executor)
    select = sel_stage.run(log)
    result.stages["select"] = sel_stage
    result.keep = select.keep
    if cfg.write and dataset is not None:
        from pipelines.datasets import dataset_write_stage

        wr_stage = dataset_write_stage(out, select, dataset, cfg)
        result.manifest = wr_stage.run(log)
        result.stages["write"] = wr_stage
    elif cfg.write and shard_list:
        wr_stage = WriteStage(
            out,
            select,
            shard_list,
            max_count=cfg.shard_max_count,
            max_size=cfg.shard_max_size,
            progress=progress,
            executor=executor,
        )
        result.manifest = wr_stage.run(log)
        result.stages["write"] = wr_stage
    result.seconds = time.perf_counter() - t0
    return result


def _encoder(cfg: FilterConfig, shard_list: list[str]):
    """The encoder object (or factory) to embed ``shard_list`` with."""
    if not shard_list:
        raise ValueError("give shards to embed, or precomputed embeddings")
    encoder = cfg.encoder
    if encoder is None:
        if cfg.model is None:
            raise ValueError("give an encoder/model to embed with, or precomputed embeddings")
        from pipelines.encoders import make_encoder

        encoder = make_encoder(
            cfg.model, cfg.pretrained, device=cfg.device, precision=cfg.precision, seed=cfg.model_seed
        )
    if getattr(encoder, "fingerprint", None) is None:
        raise ValueError("the encoder (or factory) needs a .fingerprint dict")
    return encoder


__all__ = ["FilterConfig", "FilterResult", "PipelineError", "default_steps", "filter_config", "run_filter"]
