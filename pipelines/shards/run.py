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
    OUT/.prunekit.json, OUT/.prunekit.lock   the ownership marker and the run lock

Before any work: every option is checked (:func:`check_config`), then the inputs
(:func:`check_inputs`: files exist and their headers/footers read), inputs inside ``OUT`` and
files in ``OUT`` that prunekit did not write are refused, and ``OUT`` is locked for the run
(:mod:`pipelines.shards.outdir`); tar headers are scanned for duplicate keys before embedding.
"""

from __future__ import annotations

import glob
import math
import os
import re
import sys
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

from pipelines.encoders import EncoderSpec
from prunecore.deprecation import warn_renamed
from prunecore.memory import parse_size
from prunecore.rows import open_embeddings

from .checks import in_range as _in_range
from .checks import positive_int as _positive_int
from .cluster import ClusterStage
from .config import FilterConfig, filter_config
from .decode import decode_options_of
from .embed import EmbedStage
from .inputs import PrecomputedEmbeddings
from .outdir import check_inputs_outside, claim_output, output_lock
from .select import SelectStage
from .stage import PipelineError, parquet_columns
from .steps import STEPS, build_step, chain_steps, cli_flags, flag_params, method_choices, normalize_steps
from .tario import ShardError, expand_shards, scan_headers
from .threads import compute_threads, resolve_threads
from .write import WriteStage

# files prunekit writes under OUT, per folder (a stage's ``owned`` patterns; report/ by prunekit report)
OWNED = {
    "embed": tuple(dict.fromkeys(EmbedStage.owned + PrecomputedEmbeddings.owned)),
    "cluster": ClusterStage.owned,
    "select": SelectStage.owned,
    "write": WriteStage.owned,
    "report": ("index.html", "*.png"),
}


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
                    f"{s.get('undecodable', 0)} undecodable, {s.get('too_large', 0)} too large, "
                    f"{len(s.get('corrupt_shards', []))} corrupt shard(s)"
                )
                extra = {label: s.get(name, 0) for name, label in TAR_COUNTS.items() if s.get(name, 0)}
                res += "".join(f", {v} {label}" for label, v in extra.items())
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
            status = "skipped (up to date)" if st.skipped else ("repaired" if st.repaired else "ran")
            lines.append(f"| {name} | {status} | {s.get('seconds', 0):.2f} | {res} |")
        return "\n".join(lines)


TAR_COUNTS = {
    "no_image": "no image (links/devices only)",
    "non_utf8_name": "non-UTF-8 name",
    "unsafe_names": "unsafe member name(s) (../ or absolute)",
    "special_members": "link/device member(s)",
}


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
    method="dbp",
    **params,
) -> list[dict]:
    """The CLI's chain: the steps that their own flags add, in registration order
    ([clipscore] -> [semdedup]), then the ``method`` step (dbp/ssp/random/semdedup/none).

    ``params``: the step flags' values by their ``default_steps`` keyword (``dedup_eps``,
    ``clip_score_min``, ``keep``, ``order``...; :func:`~pipelines.shards.steps.cli_flags`),
    and for the method step any of its parameters by name (``seed``, ``min_per_cluster``...;
    see :mod:`pipelines.shards.steps`). ``None`` or a parameter a step does not have is left
    out, so the step's own default applies; ``order`` sets the order of every step that has
    one (SemDeDup, DBP, SSP). A deprecated flag's keyword (``ssp_mode``: SSP's order only)
    still works with a ``DeprecationWarning``.
    """
    for flag, _ in cli_flags():
        if flag.replaced_by and params.get(flag.dest) is not None:
            new = flag.replaced_by.lstrip("-").replace("-", "_")
            warn_renamed(f"default_steps({flag.dest}=...)", f"{new}=...")
    return steps_from_flags(method, params)


def steps_from_flags(method, params: dict) -> list[dict]:
    """:func:`default_steps` without its deprecation warnings (the CLI warns on stderr itself)."""
    flags = [flag for flag, _ in cli_flags()]
    known = {f.dest for f in flags}.union(
        *(cls.defaults() for cls in STEPS.values()), *(c.renamed for c in STEPS.values())
    )
    if set(params) - known:
        raise TypeError(f"unknown step parameter(s) {sorted(set(params) - known)}; known: {sorted(known)}")
    params = {k: v for k, v in params.items() if v is not None}
    choices = method_choices()
    if method not in (*choices, None, "none"):
        raise ValueError(f"unknown method {method!r}: choose {', '.join(choices)} or none")
    steps = []
    for name in chain_steps():
        if any(dest in params for dest in STEPS[name].enabled_by):
            steps.append({"method": name, **flag_params(STEPS[name], params)})
        elif name == method:
            enabling = " or ".join(f.name for f in STEPS[name].flags if f.dest in STEPS[name].enabled_by)
            raise ValueError(f"--method {name} needs {enabling}")
    if method in choices and method not in chain_steps():
        fields = {**STEPS[method].defaults(), **STEPS[method].renamed}
        by_name = {k: v for k, v in params.items() if k in fields}
        steps.append({"method": method, **by_name, **flag_params(STEPS[method], params)})
    if not steps:
        raise ValueError("nothing to do: give --dedup-eps and/or a --method")
    return steps


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
    steps = check_config(cfg)
    out = Path(out)
    shard_list, files, dataset_paths = check_inputs(shards, cfg)
    check_inputs_outside(out, [*shard_list, *files[0], *files[1], *files[2], *dataset_paths])
    claim_output(out, _owned_patterns(cfg))
    cfg = replace(cfg, threads=resolve_threads(cfg.threads))  # recorded by the stages it can change
    with output_lock(out, wait=cfg.wait_lock, log=cfg.log), compute_threads(cfg.threads):
        result = _run_stages(cfg, steps, out, shard_list, files)
    result.seconds = time.perf_counter() - t0
    return result


def check_inputs(shards, cfg: FilterConfig) -> tuple[list[str], list[list[str]], list[str]]:
    """Check the inputs before any work (nothing is written, no user code runs): every shard
    and precomputed file exists, the input kinds are not mixed, every ``.npy`` has a readable
    header and every parquet file (``--metadata``, the ``--hf-dataset`` files) a readable
    footer; errors name the file.
    Returns (shard paths, [embedding, metadata, text embedding files], dataset paths)."""
    shard_list = expand_shards(shards) if shards is not None else []
    files = [_glob_files(spec) for spec in (cfg.embeddings, cfg.metadata, cfg.text_embeddings)]
    if cfg.hf_dataset is not None and (shard_list or cfg.embeddings is not None):
        raise ValueError("give either shards / precomputed embeddings or a Hugging Face dataset, not both")
    dataset_paths = dataset_files(cfg.hf_dataset)
    for path in files[0] + files[2]:
        open_embeddings(path)  # the .npy header only (memory-mapped)
    for path in files[1] + [p for p in dataset_paths if p.endswith(".parquet")]:
        parquet_columns(path)  # the footer only: a corrupt file is named here, not deep inside a loader
    return shard_list, files, dataset_paths


def dataset_files(hf_dataset) -> list[str]:
    """The local files of a ``--hf-dataset`` given by path(s) (globs expanded; the data files
    of a folder, recursively, without hidden ones); none for a Dataset object or a remote URL
    (the loader refuses those). Raises FileNotFoundError naming a path that matches nothing."""
    if not isinstance(hf_dataset, (str, os.PathLike, list, tuple)):
        return []
    items = [hf_dataset] if isinstance(hf_dataset, (str, os.PathLike)) else list(hf_dataset)
    found = []
    for item in items:
        path = os.fspath(item).removeprefix("file://")
        if "://" in path:
            continue
        matched = sorted(glob.glob(path), key=_natural) if glob.has_magic(path) else [path]
        matched = [m for m in matched if os.path.exists(m)]
        if not matched:
            raise FileNotFoundError(
                f"no dataset at {path!r} (--hf-dataset): give a save_to_disk folder, a folder of data files, "
                "or .parquet/.arrow/.tar files (globs allowed)"
            )
        for m in matched:
            found.append(m)
            if os.path.isdir(m):
                found += [str(p) for p in sorted(Path(m).rglob("*")) if p.is_file() and not _hidden(p, m)]
    return found


def _hidden(path: Path, root: str) -> bool:
    """Whether a file under ``root`` is hidden from a dataset loader (a ``.``/``__`` part)."""
    return any(part.startswith((".", "__")) for part in path.relative_to(root).parts)


def _owned_patterns(cfg: FilterConfig) -> dict:
    """:data:`OWNED`, plus the dataset writer's files when the input is a Hugging Face dataset."""
    if cfg.hf_dataset is None:
        return OWNED
    from .write_dataset import DatasetOutput

    return {**OWNED, "write": OWNED["write"] + DatasetOutput.owned}


def _run_stages(cfg: FilterConfig, steps: list[dict], out: Path, shard_list: list[str], files: list) -> FilterResult:
    """The chain under the lock: embed/ingest -> cluster -> select -> write."""
    text = any(STEPS[s["method"]].needs_texts for s in steps) if cfg.text is None else cfg.text
    executor = make_executor(cfg.backend, cfg.ray_address)
    log, progress, verify = cfg.log, cfg.progress, cfg.verify

    result = FilterResult(out)
    dataset = None
    if cfg.hf_dataset is not None:
        from pipelines.datasets import dataset_embed_stage

        encoder = None if cfg.embedding_column else _encoder(cfg, [cfg.hf_dataset])
        dataset, emb_stage = dataset_embed_stage(out, cfg, encoder, text=text, executor=executor)
    elif cfg.embeddings is not None:
        precomputed = PrecomputedEmbeddings(
            files[0],
            files[1],
            shards=shard_list,
            text_embeddings=files[2],
            key_column=cfg.key_column,
            progress=progress,
        )
        emb_stage = EmbedStage(out, precomputed, progress=progress)
    else:
        emb_stage = EmbedStage(
            out,
            shard_list,
            _encoder(cfg, shard_list),
            batch_size=cfg.batch_size,
            text=text,
            dtype=cfg.storage_dtype,
            strict=cfg.strict,
            decode=decode_options_of(cfg),
            progress=progress,
            executor=executor,
            threads=cfg.threads,
        )
        if not emb_stage.finished():
            preflight(emb_stage.shards, cfg, log)
    embed = emb_stage.run(log, verify=verify)
    result.stages["embed"] = emb_stage
    for err in emb_stage.summary.get("corrupt_shards", []):
        log(f"[embed] WARNING {err}")
    for note in emb_stage.summary.get("name_examples", []):
        log(f"[embed] WARNING {note}")
    cl_stage = ClusterStage(
        out,
        embed,
        k=cfg.clusters,
        niter=cfg.kmeans_iter,
        seed=cfg.seed,
        max_points_per_centroid=cfg.max_points_per_centroid,
        device=cfg.device,
        threads=cfg.threads,
    )
    cluster = cl_stage.run(log, verify=verify)
    result.stages["cluster"] = cl_stage
    sel_stage = SelectStage(
        out,
        embed,
        cluster,
        steps,
        device=cfg.device,
        progress=progress,
        executor=executor,
        memory_limit=cfg.memory_limit,
        threads=cfg.threads,
    )
    select = sel_stage.run(log, verify=verify)
    result.stages["select"] = sel_stage
    result.keep = select.keep
    if cfg.write and dataset is not None:
        from pipelines.datasets import dataset_write_stage

        wr_stage = dataset_write_stage(out, select, dataset, cfg)
        result.manifest = wr_stage.run(log, verify=verify)
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
        result.manifest = wr_stage.run(log, verify=verify)
        result.stages["write"] = wr_stage
    return result


def preflight(shards: list[str], cfg: FilterConfig, log) -> None:
    """Before embedding: scan the tar headers (duplicate keys; with ``strict`` problem names
    and corrupt tars) and check that ``--clusters`` can be met by the samples there. Shards
    that are unreadable or hold no sample are named (not blamed on ``--clusters``)."""
    scans = scan_headers(shards, strict=cfg.strict, progress=cfg.progress)
    total = sum(s.n_samples for s in scans)
    unusable = [
        s.error or f"{s.shard} holds no sample (no member named <key>.<ext>)"
        for s in scans
        if s.error or not s.n_samples
    ]
    if total == 0:
        raise ShardError(f"the shards hold no samples: {'; '.join(unusable[:3])}")
    if cfg.clusters > total:
        bad = f" ({len(unusable)} shard(s) gave none: {'; '.join(unusable[:3])})" if unusable else ""
        raise PipelineError(f"--clusters {cfg.clusters} is more than the {total} samples in the shards{bad}: lower it")
    log(f"[embed] {total:,} samples in {len(shards)} shard(s); keys unique")


def check_step(step: dict) -> None:
    """Deprecated (kept for one release): a step checks its parameters itself when it is built
    (:meth:`~pipelines.shards.steps.Step.check`); use :func:`~pipelines.shards.steps.build_step`."""
    warnings.warn("check_step is deprecated: build_step(step) checks the step", DeprecationWarning, stacklevel=2)
    build_step(step)


def check_config(cfg: FilterConfig) -> list[dict]:
    """Check every option before any work starts; returns the normalized steps.

    Raises ValueError naming the option (its CLI flag) and what it accepts."""
    for name in ("clusters", "kmeans_iter", "max_points_per_centroid", "batch_size", "shard_max_count"):
        _positive_int("--" + name.replace("_", "-"), getattr(cfg, name))
    _positive_int("--shard-max-size", cfg.shard_max_size)
    for name in ("seed", "model_seed"):
        _positive_int("--" + name.replace("_", "-"), getattr(cfg, name), 0)
    if cfg.threads is not None:
        _positive_int("--threads", cfg.threads)
    choices = {
        "storage_dtype": ("float16", "float32"),
        "precision": ("fp32", "fp16", "bf16"),
        "backend": ("local", "ray"),
    }
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            raise ValueError(f"--{name.replace('_', '-')} must be one of {allowed}, got {getattr(cfg, name)!r}")
    if not isinstance(cfg.key_column, str) or not cfg.key_column:
        raise ValueError(f"--key-column must be a column name, got {cfg.key_column!r}")
    if not isinstance(cfg.device, str) or not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", cfg.device):
        raise ValueError(f"--device must be auto, cpu, mps, cuda or cuda:N, got {cfg.device!r}")
    check_device(cfg.device)
    if cfg.decode_workers is not None:
        _positive_int("--decode-workers", cfg.decode_workers, 0)
    _in_range("--jpeg-draft", cfg.jpeg_draft, 0.0, math.inf, hi_open=True)
    _positive_int("--max-pixels", cfg.max_pixels)
    _positive_int("--chunk-rows", cfg.chunk_rows)
    if cfg.hf_output_format not in (None, "disk", "parquet"):
        raise ValueError(f"--hf-output-format must be disk or parquet, got {cfg.hf_output_format!r}")
    if cfg.hf_output_format == "disk" and _streams(cfg):
        raise ValueError(
            "--hf-output-format disk: a streaming input is written as parquet shards: use --hf-output-format "
            "parquet, or drop --streaming"
        )
    if cfg.memory_limit is not None:
        try:
            parse_size(cfg.memory_limit)
        except ValueError as exc:
            raise ValueError(f"--memory-limit: {exc}") from None
    return normalize_steps(list(default_steps() if cfg.steps is None else cfg.steps))  # each step checks itself


def check_device(device: str) -> None:
    """Raise ValueError when this machine lacks the ``--device`` asked for (``cuda`` without a
    CUDA device, ``cuda:N`` past the last one, ``mps`` without Metal)."""
    import torch

    kind, _, index = device.partition(":")
    if kind == "cuda":
        count = torch.cuda.device_count()
        if count == 0:
            raise ValueError(
                f"--device {device}: torch sees no CUDA device on this machine: use --device cpu (or auto)"
            )
        if index and int(index) >= count:
            raise ValueError(
                f"--device {device}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}: pick one "
                "of those (or cpu/auto)"
            )
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ValueError(
            f"--device {device}: torch sees no Metal (mps) device on this machine: use --device cpu (or auto)"
        )


def _streams(cfg: FilterConfig) -> bool:
    """Whether the ``hf_dataset`` input is read as a stream (``--streaming``, or an IterableDataset)."""
    datasets = sys.modules.get("datasets")  # an IterableDataset object means the module is loaded
    iterable = datasets is not None and isinstance(
        cfg.hf_dataset, (datasets.IterableDataset, datasets.IterableDatasetDict)
    )
    return cfg.streaming or iterable


def _encoder(cfg: FilterConfig, shard_list: list[str]):
    """The encoder object (or factory) to embed ``shard_list`` with."""
    if not shard_list:
        raise ValueError("give shards to embed, or precomputed embeddings")
    encoder = cfg.encoder
    if isinstance(encoder, EncoderSpec):  # --encoder: its code runs now, after every check
        encoder = encoder.load()
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
