"""``prunekit`` command line: ``prunekit filter SHARDS --out OUT ...``, ``prunekit report OUT``,
``prunekit serve-dllm FOLDER``."""

from __future__ import annotations

import argparse
import errno
import os
import pickle
import sys

from .encoders import EncoderSpec
from .shards.run import FilterConfig, filter_config, run_filter, steps_from_flags
from .shards.steps import STEPS, chain_steps, cli_flags, method_choices

DEFAULTS = FilterConfig()


def _size(text: str) -> int:
    """'3e9', '500MB', '2GB' -> bytes."""
    units = {"kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
    low = text.strip().lower()
    for u, f in units.items():
        if low.endswith(u):
            return int(float(low[:-2]) * f)
    return int(float(low))


class DeprecatedFlag(argparse.Action):
    """A deprecated spelling of a flag, kept one release: it stores its value like before and
    prints one warning line on stderr naming the flag to use (``replaced_by``)."""

    def __init__(self, option_strings, dest, *, replaced_by: str, **kwargs):
        kwargs.setdefault("default", argparse.SUPPRESS)  # the new flag's default stands
        kwargs.setdefault("help", f"deprecated, removed in the next release: use {replaced_by}")
        super().__init__(option_strings, dest, **kwargs)
        self.replaced_by = replaced_by

    def __call__(self, parser, namespace, values, option_string=None):
        print(
            f"{parser.prog}: warning: {option_string} is deprecated and will be removed in the next release: "
            f"use {self.replaced_by}",
            file=sys.stderr,
        )
        setattr(namespace, self.dest, values)


class _DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` except where there is none (the step flags name their own)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="prunekit", description="Prune datasets before training.")
    sub = p.add_subparsers(dest="command", required=True)

    f = sub.add_parser(
        "filter",
        help="filter webdataset shards: embed, cluster, select, write",
        formatter_class=_DefaultsHelp,
    )
    f.add_argument(
        "shards", nargs="*", help="shard paths, brace patterns ('d/{00000..00099}.tar'), globs or file:// URLs"
    )
    f.add_argument("--out", required=True, help="output folder (artifacts of every stage)")
    g = f.add_argument_group("embedding")
    g.add_argument(
        "--model",
        help="open_clip model name (ViT-B-32), a model config .json, or hf:PATH for a transformers vision model",
    )
    g.add_argument(
        "--pretrained", help="open_clip pretrained tag or local checkpoint path (omit for random weights: testing only)"
    )
    g.add_argument(
        "--encoder",
        help="MODULE:FACTORY of your own encoder: prunekit IMPORTS that module and CALLS that factory "
        "(with --encoder-kwargs), so this runs your code with your permissions; give only code you trust. "
        "The factory returns an object with .fingerprint and .encode_images(list of PIL images) -> (B, d); "
        "replaces --model",
    )
    g.add_argument("--encoder-kwargs", default="{}", help="JSON keyword arguments of the --encoder factory")
    g.add_argument(
        "--precision",
        default=DEFAULTS.precision,
        choices=["fp32", "fp16", "bf16"],
        help="the encoder's compute precision",
    )
    g.add_argument("--model-seed", type=int, default=DEFAULTS.model_seed, help="seed of random weights")
    g.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size)
    g.add_argument(
        "--storage-dtype",
        default=DEFAULTS.storage_dtype,
        choices=["float16", "float32"],
        help="dtype the embedding chunks are stored in",
    )
    g.add_argument(
        "--dtype",
        dest="storage_dtype",
        choices=["float16", "float32"],
        action=DeprecatedFlag,
        replaced_by="--storage-dtype",
    )
    g.add_argument(
        "--decode-workers",
        type=int,
        default=DEFAULTS.decode_workers,
        help="image decode processes (default: one per core minus one; 0: decode in the encoding process)",
    )
    g.add_argument(
        "--jpeg-draft",
        type=float,
        default=DEFAULTS.jpeg_draft,
        help="decode JPEGs at a reduced DCT scale keeping at least this multiple of the model's input side (0: off)",
    )
    g.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULTS.max_pixels,
        help="images with more decoded pixels get status too_large instead of being decoded",
    )
    g.add_argument(
        "--gpu-decode",
        action="store_true",
        help="decode JPEGs in batches on the device (torchvision nvjpeg on CUDA), CPU fallback",
    )
    g.add_argument(
        "--embeddings",
        nargs="+",
        help="precomputed image embeddings (.npy files or globs, e.g. 'emb/img_emb_*.npy'): skips decoding",
    )
    g.add_argument("--metadata", nargs="+", help="metadata parquet per embedding file, with keys")
    g.add_argument("--text-embeddings", nargs="+", help="precomputed caption embeddings")
    g.add_argument("--key-column", default=DEFAULTS.key_column)
    g.add_argument(
        "--strict",
        action="store_true",
        help="stop on the first missing/undecodable image, corrupt shard, non-UTF-8 or unsafe (../, absolute) "
        "member name instead of counting and reporting it",
    )
    h = f.add_argument_group("Hugging Face dataset / parquet input (instead of shards)")
    h.add_argument(
        "--hf-dataset",
        help="a local dataset: save_to_disk folder, folder of data files, or .parquet/.arrow/.tar files (globs)",
    )
    h.add_argument("--split", help="split of a dataset with several (default: its only split)")
    h.add_argument("--image-column", default=DEFAULTS.image_column, help="column of encoded images to embed")
    h.add_argument("--text-column", help="column of captions (CLIP score)")
    h.add_argument(
        "--embedding-column", help="column of precomputed embeddings (list of floats per row): skips decoding"
    )
    h.add_argument("--id-column", help="column of unique row ids for the keep-list (default: the row index)")
    h.add_argument("--chunk-rows", type=int, default=DEFAULTS.chunk_rows, help="rows per embed resume unit")
    h.add_argument(
        "--streaming",
        action="store_true",
        help="read the files as a stream (IterableDataset: no Arrow cache, one pass per stage)",
    )
    h.add_argument(
        "--hf-output-format",
        choices=["disk", "parquet"],
        help="filtered dataset (OUT/write/dataset) as a save_to_disk folder or parquet shards "
        "(default: disk; parquet with --streaming)",
    )
    h.add_argument("--hf-cache-dir", help="cache folder of load_dataset (default: the datasets cache)")
    c = f.add_argument_group("clustering")
    c.add_argument("--clusters", type=int, default=DEFAULTS.clusters, help="k of spherical k-means")
    c.add_argument("--kmeans-iter", type=int, default=DEFAULTS.kmeans_iter)
    c.add_argument(
        "--max-points-per-centroid",
        type=int,
        default=DEFAULTS.max_points_per_centroid,
        help="k-means trains on at most k * this many sampled rows",
    )
    c.add_argument(
        "--seed", type=int, default=DEFAULTS.seed, help="seed of k-means sampling and of the dbp/random steps"
    )
    add_step_flags(f)
    w = f.add_argument_group("output shards")
    w.add_argument("--no-write", action="store_true", help="stop after the keep-list")
    w.add_argument("--shard-max-count", type=int, default=DEFAULTS.shard_max_count)
    w.add_argument(
        "--shard-max-size", type=_size, default=DEFAULTS.shard_max_size, help="bytes per output shard (e.g. 3e9, 500MB)"
    )
    r = f.add_argument_group("execution")
    r.add_argument("--device", default=DEFAULTS.device, help="auto, cpu, cuda, cuda:1 ...")
    r.add_argument("--backend", default=DEFAULTS.backend, choices=["local", "ray"])
    r.add_argument("--ray-address", help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")
    r.add_argument(
        "--threads",
        type=int,
        help="torch/faiss CPU threads for the whole run (default: torch's count); recorded in the fingerprints",
    )
    r.add_argument(
        "--memory-limit",
        help="buffers of the select stage, e.g. 4GB (default: half the machine's memory); embeddings larger "
        "than a quarter of it get a cluster-sorted copy on disk so each cluster is one contiguous read",
    )
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    r.add_argument(
        "--verify",
        action="store_true",
        help="before trusting a finished stage, check the sha256 of all its files (default: sizes, and "
        "sha256 of files whose mtime changed); a changed file is redone",
    )
    r.add_argument(
        "--wait-lock",
        action="store_true",
        help="when another run holds --out, wait for it instead of exiting with an error",
    )

    rep = sub.add_parser("report", help="write OUT/report/index.html with plots")
    rep.add_argument("out", help="the folder given to `prunekit filter --out`")
    rep.add_argument("--clusters-shown", type=int, default=4, help="clusters in the kept-vs-dropped image grid")
    rep.add_argument("--images-per-row", type=int, default=8)
    add_serve_dllm_parser(sub)
    return p


def add_step_flags(parser) -> None:
    """The selection group, built from the step registry (:data:`pipelines.shards.STEPS`): the
    flags that add a chain step (``--clip-score-*``, ``--dedup-eps``), ``--method`` (every step
    offered as one, or none), then the other step flags; each flag is declared by its step."""
    group = parser.add_argument_group(f"selection (chain: {' -> '.join([*chain_steps(), 'method'])})")
    enabling = {dest for name in chain_steps() for dest in STEPS[name].enabled_by}
    flags = cli_flags()  # the enabling flags come first
    for i, (flag, text) in enumerate(flags):
        if flag.dest not in enabling and (i == 0 or flags[i - 1][0].dest in enabling):
            group.add_argument("--method", default="dbp", choices=[*method_choices(), "none"])
        if flag.replaced_by:
            group.add_argument(
                flag.name, type=flag.type, choices=flag.choices, action=DeprecatedFlag, replaced_by=flag.replaced_by
            )
        else:
            group.add_argument(flag.name, type=flag.type, choices=flag.choices, help=text)


def add_serve_dllm_parser(sub) -> None:
    """``prunekit serve-dllm FOLDER``: the OpenAI-compatible dLLM server (docs/localleap.md, Serving)."""
    sv = sub.add_parser(
        "serve-dllm",
        help="serve a LLaDA / Dream folder: OpenAI-compatible HTTP API with continuous batching",
        formatter_class=_DefaultsHelp,
    )
    sv.add_argument("folder", help="checkpoint folder of LLaDA or Dream (published layout)")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes the server)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--model-name", help="the model id clients send (default: the folder's name)")
    d = sv.add_argument_group("decoding (defaults; requests may override them as extra body fields)")
    d.add_argument("--rule", default="localleap", choices=["localleap", "fastdllm", "llada", "eb"])
    d.add_argument("--threshold", type=float, default=0.9)
    d.add_argument("--relaxed-threshold", type=float, default=0.75)
    d.add_argument("--radius", type=int, default=4)
    d.add_argument("--gamma", type=float, default=1e-3, help="EB-sampler entropy budget")
    d.add_argument("--steps", type=int, help="LLaDA rule: total steps over the canvas (default: one token per step)")
    d.add_argument("--block-length", type=int, default=32)
    d.add_argument("--cache", default="none", choices=["none", "prefix", "dual"])
    d.add_argument("--max-tokens", type=int, default=256, help="max_tokens of requests that give none")
    b = sv.add_argument_group("batching and resources")
    b.add_argument("--max-batch", type=int, default=8, help="rows in the running batch")
    b.add_argument("--max-queue", type=int, default=64, help="waiting requests; more are answered 429")
    b.add_argument("--max-context", type=int, help="prompt + canvas limit (default: the model's config)")
    b.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    b.add_argument(
        "--precision", default="auto", help="the model's compute precision: auto, fp32, bf16, fp16 or float64"
    )
    b.add_argument("--dtype", dest="precision", action=DeprecatedFlag, replaced_by="--precision")
    b.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    b.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "filter":
            return _filter(args)
        if args.command == "serve-dllm":
            return serve_dllm(args)
        return _report(args)
    except KeyboardInterrupt:
        print(f"prunekit {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except Exception as exc:  # every failure: one line naming what and the fix, exit code 2
        if os.environ.get("PRUNEKIT_DEBUG"):
            raise
        print(f"prunekit {args.command}: error: {error_line(exc, args)}", file=sys.stderr)
        return 2


def error_line(exc: BaseException, args) -> str:
    """One line for a failure: the message's first line, with the file and the fix where the
    exception type says what happened (disk full, a refused checkpoint, an I/O error)."""
    lines = str(exc).strip().splitlines()
    first = lines[0] if lines else type(exc).__name__
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        where = exc.filename or getattr(args, "out", "")
        return (
            f"no space left on the device writing {where}: free space (or use another --out) "
            "and rerun the same command; finished work is kept and resumed"
        )
    if isinstance(exc, pickle.UnpicklingError) or "weights_only" in first.lower():
        return (
            f"the checkpoint {getattr(args, 'pretrained', None) or ''} was refused: it is not a plain tensor "
            f"file that torch loads with weights_only=True ({first}); export its state_dict (or safetensors) "
            "from a trusted copy and pass that"
        )
    if isinstance(exc, OSError) and exc.filename:
        return f"{exc.strerror or first}: {exc.filename}"
    if isinstance(exc, (ValueError, TypeError, FileNotFoundError, OSError)):
        return first
    return f"{type(exc).__name__}: {first} (set PRUNEKIT_DEBUG=1 to see the traceback)"


def _filter(args) -> int:
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be an integer >= 1, got {args.threads}")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if not args.shards and not args.embeddings and not args.hf_dataset:
        raise ValueError("give shards and/or --embeddings, or --hf-dataset")
    if not args.encoder and args.embeddings is None and args.embedding_column is None and args.model is None:
        raise ValueError("give --model (and --pretrained) to embed, or --embeddings / --embedding-column")
    flags = {flag.dest: getattr(args, flag.dest, None) for flag, _ in cli_flags()}
    steps = steps_from_flags(args.method, {"seed": args.seed, **flags})  # deprecated flags warned when parsed
    config = filter_config(
        model=args.model,
        pretrained=args.pretrained,
        precision=args.precision,
        model_seed=args.model_seed,
        embeddings=args.embeddings,
        metadata=args.metadata,
        text_embeddings=args.text_embeddings,
        key_column=args.key_column,
        hf_dataset=args.hf_dataset,
        split=args.split,
        image_column=args.image_column,
        text_column=args.text_column,
        embedding_column=args.embedding_column,
        id_column=args.id_column,
        chunk_rows=args.chunk_rows,
        streaming=args.streaming,
        hf_output_format=args.hf_output_format,
        hf_cache_dir=args.hf_cache_dir,
        batch_size=args.batch_size,
        storage_dtype=args.storage_dtype,
        decode_workers=args.decode_workers,
        jpeg_draft=args.jpeg_draft,
        max_pixels=args.max_pixels,
        gpu_decode=args.gpu_decode,
        clusters=args.clusters,
        kmeans_iter=args.kmeans_iter,
        max_points_per_centroid=args.max_points_per_centroid,
        seed=args.seed,
        steps=steps,
        write=not args.no_write,
        shard_max_count=args.shard_max_count,
        shard_max_size=args.shard_max_size,
        strict=args.strict,
        device=args.device,
        backend=args.backend,
        ray_address=args.ray_address,
        memory_limit=args.memory_limit,
        progress=not args.quiet,
        verify=args.verify,
        wait_lock=args.wait_lock,
    )
    # the encoder spec is only checked here: run_filter imports it after every option and input is checked
    encoder = EncoderSpec.parse(args.encoder, args.encoder_kwargs) if args.encoder else None
    result = run_filter(args.shards or None, args.out, config, encoder=encoder)
    print()
    print(result.table())
    print(f"\nkeep-list: {result.out / 'select' / 'keep.parquet'}")
    if result.manifest and "path" in result.manifest:
        print(f"filtered dataset: {result.manifest['path']} ({result.manifest['format']})")
    elif result.manifest:
        print(f"filtered shards: {result.out / 'write'} (manifest.json)")
    return 0


def serve_dllm(args) -> int:
    from .serve_dllm.engine import DecodeOptions
    from .serve_dllm.server import serve

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    defaults = DecodeOptions(
        rule=args.rule,
        threshold=args.threshold,
        relaxed_threshold=args.relaxed_threshold,
        radius=args.radius,
        gamma=args.gamma,
        steps=args.steps,
        block_length=args.block_length,
        cache=args.cache,
    )
    serve(
        args.folder,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        defaults=defaults,
        max_tokens=args.max_tokens,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        max_context=args.max_context,
        device=args.device,
        dtype=args.precision,
        model_name=args.model_name,
    )
    return 0


def _report(args) -> int:
    from .shards.report import write_report

    path = write_report(args.out, clusters_shown=args.clusters_shown, images_per_row=args.images_per_row)
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
