"""Filtering webdataset shards: tar I/O, one module per stage, the selection steps, the runner.

``tario`` (read/write tars) -> ``stage`` (fingerprint, skip/resume) -> ``embed`` (over one
of the ``inputs``: tar shards, dataset rows, precomputed embeddings) -> ``cluster`` ->
``select`` (``steps``: one class per method) -> ``write`` (tar or dataset output); ``run``
chains them (:func:`run_filter`), ``report`` draws a finished run.
"""

from .run import FilterConfig, FilterResult, default_steps, filter_config, run_filter
from .stage import PipelineError
from .steps import STEPS, Flag, Step, register_step
from .tario import (
    IMAGE_EXTS,
    TEXT_EXTS,
    RawSample,
    ShardError,
    ShardScan,
    expand_shards,
    iter_shard,
    iter_shard_headers,
    plan_output_shards,
    split_member_name,
    write_tar,
)

__all__ = [
    "IMAGE_EXTS",
    "STEPS",
    "TEXT_EXTS",
    "FilterConfig",
    "FilterResult",
    "Flag",
    "PipelineError",
    "RawSample",
    "ShardError",
    "ShardScan",
    "Step",
    "default_steps",
    "expand_shards",
    "filter_config",
    "iter_shard",
    "iter_shard_headers",
    "plan_output_shards",
    "register_step",
    "run_filter",
    "split_member_name",
    "write_tar",
]
