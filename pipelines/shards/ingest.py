"""Deprecated (kept for one release): precomputed embeddings are an input of the embed stage,
``EmbedStage(out, PrecomputedEmbeddings(embeddings, metadata, ...))``
(:mod:`pipelines.shards.inputs.precomputed`)."""

from __future__ import annotations

import warnings

from .embed import EmbedStage
from .inputs import PrecomputedEmbeddings


def IngestStage(out, embeddings, metadata, *, progress: bool = True, **options) -> EmbedStage:  # noqa: N802 - a deprecated class name
    """Deprecated: ``EmbedStage(out, PrecomputedEmbeddings(embeddings, metadata, ...))``."""
    warnings.warn(
        "IngestStage is deprecated: use EmbedStage(out, PrecomputedEmbeddings(embeddings, metadata, ...))",
        DeprecationWarning,
        stacklevel=2,
    )
    source = PrecomputedEmbeddings(embeddings, metadata, progress=progress, **options)
    return EmbedStage(out, source, progress=progress)
