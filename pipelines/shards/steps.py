"""Selection steps: one small class per method, registered in :data:`STEPS` by name.

A step is written as a dict ``{"method": name, **params}`` (what the select stage stores
and fingerprints). Each class declares its parameters and their defaults once, as
dataclass fields; :func:`normalize_steps` fills them in and rejects unknown ones, and
:func:`run_step` runs one step on rows (m, d) with their clustering -> a Selection (m,).
A new step is one class with ``@register_step``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from prunecore.budget import keep_count, top_k_mask
from prunecore.cluster import Clustering, l2_normalize

from .stage import PipelineError

STEPS: dict[str, type[Step]] = {}


def register_step(cls: type[Step]) -> type[Step]:
    """Class decorator: make ``cls`` available under ``cls.method``."""
    STEPS[cls.method] = cls
    return cls


@dataclass(frozen=True)
class Step:
    """Base of the selection steps; fields are the step's parameters with their defaults."""

    method: ClassVar[str]

    def run(self, rows, clustering: Clustering, texts=None, *, device="auto", progress=False):
        """rows (m, d) with their clustering (and caption rows or None) -> Selection (m,)."""
        raise NotImplementedError

    def as_dict(self) -> dict:
        return {"method": self.method, **dataclasses.asdict(self)}

    @classmethod
    def defaults(cls) -> dict:
        return {f.name: f.default for f in dataclasses.fields(cls)}


@register_step
@dataclass(frozen=True)
class ClipScoreStep(Step):
    """Keep rows whose image-caption cosine is >= ``min``, or the top ``keep`` by it."""

    method: ClassVar[str] = "clipscore"
    min: float | None = None
    keep: float | int | None = None

    def __post_init__(self):
        if (self.min is None) == (self.keep is None):
            raise ValueError("clipscore needs exactly one of min (threshold) or keep (fraction)")

    def run(self, rows, clustering, texts=None, *, device="auto", progress=False):
        from dataprune import Selection

        if texts is None:
            raise PipelineError(
                "clipscore needs caption embeddings: embed with a CLIP model "
                "and text=True (CLI: --clip-score-min/--clip-score-keep)"
            )
        scores = clip_scores(rows, texts)
        if self.min is not None:
            keep = scores >= self.min
        else:
            keep = top_k_mask(scores, keep_count(len(scores), self.keep))
        return Selection.from_mask(keep, "low_clip_score", scores=scores)


@register_step
@dataclass(frozen=True)
class SemDedupStep(Step):
    """SemDeDup: drop rows with cosine > 1 - eps to an earlier row of their cluster."""

    method: ClassVar[str] = "semdedup"
    eps: float = 0.05
    order: str = "hard"
    rule: str = "reference"
    block_size: int | None = None

    def run(self, rows, clustering, texts=None, *, device="auto", progress=False):
        from dataprune import semdedup

        return semdedup(
            rows,
            self.eps,
            clustering=clustering,
            order=self.order,
            rule=self.rule,
            block_size=self.block_size,
            device=device,
            progress=progress,
        )


@register_step
@dataclass(frozen=True)
class DBPStep(Step):
    """Density-based pruning: per-cluster quotas from cluster complexity."""

    method: ClassVar[str] = "dbp"
    keep: float | int = 0.3
    temperature: float = 0.5
    n_neighbors: int = 20
    balance: float = 0.0
    order: str = "hard"
    min_per_cluster: int = 1
    seed: int = 1234

    def run(self, rows, clustering, texts=None, *, device="auto", progress=False):
        from dataprune import prune_dbp

        params = dataclasses.asdict(self)
        return prune_dbp(rows, params.pop("keep"), clustering=clustering, device=device, **params)


@register_step
@dataclass(frozen=True)
class SSPStep(Step):
    """Self-supervised prototype pruning: keep the hardest (or easiest) rows by centroid distance."""

    method: ClassVar[str] = "ssp"
    keep: float | int = 0.5
    mode: str = "hard"

    def run(self, rows, clustering, texts=None, *, device="auto", progress=False):
        from dataprune import prune_ssp

        return prune_ssp(rows, self.keep, clustering=clustering, mode=self.mode)


@register_step
@dataclass(frozen=True)
class RandomStep(Step):
    """A seeded uniform random subset."""

    method: ClassVar[str] = "random"
    keep: float | int = 0.5
    seed: int = 1234

    def run(self, rows, clustering, texts=None, *, device="auto", progress=False):
        from dataprune import random_subset

        return random_subset(rows.shape[0], self.keep, seed=self.seed)


def build_step(step: dict) -> Step:
    """``{"method": name, **params}`` -> the step object (unknown names/params raise ValueError)."""
    params = dict(step)
    method = params.pop("method", None)
    if method not in STEPS:
        raise ValueError(f"unknown selection method {method!r}; choose from {sorted(STEPS)}")
    cls = STEPS[method]
    unknown = set(params) - set(cls.defaults())
    if unknown:
        raise ValueError(f"unknown parameter(s) {sorted(unknown)} for {method}")
    return cls(**params)


def normalize_steps(steps: Sequence[dict]) -> list[dict]:
    """Fill defaults and check step names/params. A step is ``{"method": name, ...params}``."""
    return [build_step(step).as_dict() for step in steps]


def run_step(step: dict, rows, clustering: Clustering, texts=None, *, device="auto", progress=False):
    """One selection step over ``rows`` (m, d) with their clustering: a Selection (m,)."""
    return build_step(step).run(rows, clustering, texts, device=device, progress=progress)


def clip_scores(images, texts, batch_size: int = 65536) -> np.ndarray:
    """Cosine between each row's image and caption embeddings, streamed: (n,) float32."""
    n = images.shape[0]
    out = np.empty(n, dtype=np.float32)
    for s in range(0, n, batch_size):
        e = min(s + batch_size, n)
        a = l2_normalize(np.asarray(images[s:e], dtype=np.float32), row_ids=s)
        b = l2_normalize(np.asarray(texts[s:e], dtype=np.float32), row_ids=s)
        out[s:e] = np.einsum("nd,nd->n", a, b)
    return out
