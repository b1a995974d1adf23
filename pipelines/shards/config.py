"""The options of :func:`~pipelines.shards.run.run_filter`: :class:`FilterConfig` (one field per
``prunekit filter`` flag, with its default) and :func:`filter_config`.

Deprecated option names (kept one release, :data:`RENAMED_OPTIONS`) are accepted by
``FilterConfig(...)``, ``dataclasses.replace``, :func:`filter_config` and ``run_filter`` with a
``DeprecationWarning``; the stage records keep the spelling they were written with, so a run
finished under an old name is not redone.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace

from prunecore.deprecation import warn_renamed

from .decode import DecodeOptions

RENAMED_OPTIONS = {"dtype": "storage_dtype"}  # deprecated FilterConfig names -> the names (kept one release)


def renamed_options(options: dict) -> dict:
    """``options`` with each deprecated name of :data:`RENAMED_OPTIONS` replaced by its new
    name (a ``DeprecationWarning`` each; the old name wins over a new one given too, as in
    ``dataclasses.replace``)."""
    options = dict(options)
    for old, new in RENAMED_OPTIONS.items():
        if old in options:
            warn_renamed_option(old, new, stacklevel=4)
            options[new] = options.pop(old)
    return options


def warn_renamed_option(old: str, new: str, *, stacklevel: int) -> None:
    """The run_filter option ``old`` is deprecated: use ``new`` (``stacklevel`` as ``warnings.warn``'s)."""
    warn_renamed(f"the run_filter option {old!r}", repr(new), stacklevel=stacklevel + 1)


def accepts_renamed_options(cls):
    """Class decorator: ``cls(...)`` (and ``dataclasses.replace``) take the deprecated names too."""
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self, *args, **options):
        init(self, *args, **renamed_options(options))

    cls.__init__ = __init__
    return cls


@accepts_renamed_options
@dataclass
class FilterConfig:
    """Every option of :func:`~pipelines.shards.run.run_filter` (the CLI's flags), with its default.

    Embedding source: ``encoder`` (an object, see :mod:`pipelines.encoders`, a
    zero-argument factory, or an :class:`~pipelines.encoders.EncoderSpec`, imported only
    after every check), or ``model``/``pretrained`` (open_clip name or config .json, or
    ``hf:PATH``), or precomputed ``embeddings`` + ``metadata`` files (globs; one metadata
    parquet with a ``key_column`` per ``.npy``). ``steps``: the selection chain (see
    :func:`default_steps`); each step runs on the survivors of the previous ones and a
    fraction ``keep`` is relative to the rows entering that step. ``precision``: the
    encoder's compute precision; ``storage_dtype``: the dtype the embedding chunks are stored
    in (``dtype`` is its deprecated name, kept one release).
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
    text: bool | None = None  # embed captions (default: when a step needs_texts, e.g. clipscore)
    storage_dtype: str = "float16"  # of the stored embedding chunks (the model computes in ``precision``)
    strict: bool = False  # stop on bad samples/names/tars instead of counting them
    # decoding (pipelines.shards.decode.DecodeOptions)
    decode_workers: int | None = DecodeOptions.workers  # None: one process per core minus one
    jpeg_draft: float = DecodeOptions.draft
    max_pixels: int = DecodeOptions.max_pixels
    gpu_decode: bool = DecodeOptions.gpu
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
    threads: int | None = None  # CPU threads of torch/faiss for the whole run (None: torch's count); recorded
    backend: str = "local"
    ray_address: str | None = None
    memory_limit: int | str | None = None  # select stage buffers (None: half the machine's memory)
    progress: bool = True
    log: Callable = print
    # safety
    verify: bool = False  # check the sha256 of every finished artifact before trusting it
    wait_lock: bool = False  # wait for another run holding OUT instead of failing

    @property
    def dtype(self) -> str:
        """Deprecated name of :attr:`storage_dtype` (removed in the next release)."""
        warn_renamed_option("dtype", "storage_dtype", stacklevel=3)
        return self.storage_dtype

    @dtype.setter
    def dtype(self, value: str) -> None:
        warn_renamed_option("dtype", "storage_dtype", stacklevel=3)
        self.storage_dtype = value


def filter_config(config: FilterConfig | None = None, **options) -> FilterConfig:
    """``config`` (or the defaults) with ``options`` replaced; unknown names raise TypeError."""
    names = {f.name for f in fields(FilterConfig)}
    unknown = sorted(set(options) - names - set(RENAMED_OPTIONS))
    if unknown:
        raise TypeError(f"unknown run_filter option(s) {unknown}; FilterConfig has {sorted(names)}")
    return replace(config or FilterConfig(), **renamed_options(options))


__all__ = ["FilterConfig", "RENAMED_OPTIONS", "filter_config"]
