"""Selection steps: one small class per method, registered in :data:`STEPS` by name.

A step is written as a dict ``{"method": name, **params}`` (what the select stage stores
and fingerprints). Each class owns, declared once:

* its parameters and their defaults, as dataclass fields; :func:`normalize_steps` fills them
  in and rejects unknown ones;
* its checks (:meth:`Step.check`, run at construction; errors name the CLI flag);
* its command-line flags (:attr:`Step.flags`): ``prunekit filter`` builds ``--method`` and the
  selection flags from :data:`STEPS` (:func:`method_choices`, :func:`cli_flags`), and
  :func:`~pipelines.shards.run.default_steps` maps the flags' values back to steps;
* how it runs: :meth:`Step.run` on rows (m, d) with their clustering -> a Selection (m,); a
  step whose clusters are independent says so (:attr:`Step.runs_per_cluster`) and merges
  per-cluster runs (:meth:`Step.merge_clusters`), so an executor can fan it out without
  knowing its name.

A new step is one class with ``@register_step`` (:data:`STEPS` is a :class:`prunecore.Registry`;
``tests/prunecore/test_registries.py`` runs every registered step through the same contract).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from prunecore.budget import check_keep, keep_count, top_k_mask
from prunecore.cluster import Clustering, l2_normalize
from prunecore.deprecation import warn_renamed
from prunecore.registry import Registry

from .checks import in_range, positive_int
from .stage import PipelineError

STEPS: Registry[type[Step]] = Registry("selection method")
SSP_ORDERS = ("hard", "easy")


def register_step(cls: type[Step]) -> type[Step]:
    """Class decorator: make ``cls`` available under ``cls.method`` (a taken name is a ``ValueError``)."""
    return STEPS.register(cls.method)(cls)


def parse_keep(text: str) -> float | int:
    """A ``--keep`` value: ``"0.3"`` -> 0.3 (a fraction), ``"5000"`` -> 5000 (a count)."""
    value = float(text)
    return int(value) if value > 1 and value.is_integer() else value


@dataclass(frozen=True)
class Flag:
    """One ``prunekit filter`` flag setting a step parameter: ``name`` (``"--dedup-eps"``) sets
    ``param`` (``"eps"``). Its keyword in :func:`~pipelines.shards.run.default_steps` is
    :attr:`dest` (``"dedup_eps"``). A flag shared by several steps (``--keep``, ``--order``) is
    one object listed in each one's ``flags``; ``{default}`` in ``help`` becomes the default
    (``"hard"``, or ``"dbp 0.3, ssp 0.5, random 0.5"`` when the steps' defaults differ).
    ``replaced_by``: a deprecated flag (kept one release) names the flag to use instead; it
    still sets ``param`` of its own steps only."""

    name: str
    param: str
    help: str
    type: Callable[[str], Any] | None = None
    choices: tuple | None = None
    replaced_by: str | None = None

    @property
    def dest(self) -> str:
        return self.name.lstrip("-").replace("-", "_")


KEEP = Flag(
    "--keep",
    "keep",
    "fraction (or count) of the rows entering the method step to keep (default: {default})",
    type=parse_keep,
)
ORDER = Flag(
    "--order",
    "order",
    "which rows go first: hard = farthest from their centroid (SemDeDup's walk, DBP's quota fill, SSP's "
    "ranking), easy = nearest, random = seeded shuffle (SemDeDup, DBP) (default {default})",
    choices=("hard", "easy", "random"),
)


@dataclass(frozen=True)
class Step:
    """Base of the selection steps; fields are the step's parameters with their defaults.

    Class attributes a step sets: ``method`` (its name), ``flags`` (its CLI flags),
    ``enabled_by`` (flag dests whose value adds the step to the CLI chain before the method
    step, e.g. SemDeDup's ``dedup_eps``; empty: the step is picked by ``--method``),
    ``method_choice`` (whether ``--method`` offers it), ``needs_texts`` (whether it reads the
    caption embeddings: the embed stage then embeds captions), ``example`` (parameters the
    contract test builds it with, when the defaults alone are not a valid step), ``renamed``
    (``{old: new}`` deprecated parameter names: accepted for one release with a
    ``DeprecationWarning``, and kept in :meth:`record` so finished runs stay valid).
    """

    method: ClassVar[str]
    flags: ClassVar[tuple[Flag, ...]] = ()
    enabled_by: ClassVar[tuple[str, ...]] = ()
    method_choice: ClassVar[bool] = True
    needs_texts: ClassVar[bool] = False
    example: ClassVar[dict] = {}
    renamed: ClassVar[dict[str, str]] = {}

    def __post_init__(self):
        self.check()

    def check(self) -> None:
        """Raise ``ValueError`` (naming the CLI flag) for a parameter the step would reject:
        ``keep`` (the budget rule) and every flag with choices; subclasses add their own."""
        keep = getattr(self, "keep", None)
        if keep is not None:
            try:
                check_keep(keep)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"--keep of {self.method}: {exc}") from None
        for flag in self.flags:
            value = getattr(self, flag.param)
            if flag.choices is not None and flag.replaced_by is None and value not in flag.choices:
                raise ValueError(f"{self.method} {flag.param} must be one of {flag.choices}, got {value!r}")

    def label(self, param: str) -> str:
        """How errors name ``param``: its CLI flag (``--dedup-eps``) or ``"<method> <param>"``."""
        return next((f.name for f in self.flags if f.param == param), f"{self.method} {param}")

    def run(self, rows, clustering: Clustering, texts=None, *, device="auto", progress=False):
        """rows (m, d) with their clustering (and caption rows or None) -> Selection (m,)."""
        raise NotImplementedError

    @property
    def runs_per_cluster(self) -> bool:
        """Whether :meth:`run` decides each cluster from that cluster's rows alone (then an
        executor may run it once per cluster and combine with :meth:`merge_clusters`)."""
        return False

    def merge_clusters(self, clustering: Clustering, keep: np.ndarray, scores: np.ndarray):
        """The Selection (m,) of per-cluster runs of :meth:`run`: ``keep`` (m,) bool and
        ``scores`` (m,) float32 gathered from them; ``clustering`` labels the m rows."""
        raise NotImplementedError(f"{self.method} does not run per cluster")

    def as_dict(self) -> dict:
        return {"method": self.method, **dataclasses.asdict(self)}

    def record(self) -> dict:
        """:meth:`as_dict` with each renamed parameter under the name runs were recorded with
        (``renamed``): what the select stage fingerprints, so a rename never redoes a run."""
        old_of = {new: old for old, new in self.renamed.items()}
        return {old_of.get(name, name): value for name, value in self.as_dict().items()}

    @classmethod
    def defaults(cls) -> dict:
        return {f.name: f.default for f in dataclasses.fields(cls)}


@register_step
@dataclass(frozen=True)
class ClipScoreStep(Step):
    """Keep rows whose image-caption cosine is >= ``min``, or the top ``keep`` by it."""

    method: ClassVar[str] = "clipscore"
    flags: ClassVar[tuple[Flag, ...]] = (
        Flag(
            "--clip-score-min",
            "min",
            "drop rows whose image-caption cosine is below this (needs a CLIP model; embeds captions)",
            type=float,
        ),
        Flag("--clip-score-keep", "keep", "keep this fraction/count by CLIP score", type=parse_keep),
    )
    enabled_by: ClassVar[tuple[str, ...]] = ("clip_score_min", "clip_score_keep")
    method_choice: ClassVar[bool] = False
    needs_texts: ClassVar[bool] = True
    example: ClassVar[dict] = {"keep": 0.5}
    min: float | None = None
    keep: float | int | None = None

    def check(self) -> None:
        if (self.min is None) == (self.keep is None):
            raise ValueError("clipscore needs exactly one of min (threshold) or keep (fraction)")
        super().check()
        if self.min is not None:
            in_range(self.label("min"), self.min, -1.0, 1.0)

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
    flags: ClassVar[tuple[Flag, ...]] = (
        Flag(
            "--dedup-eps",
            "eps",
            "SemDeDup: drop rows with cosine > 1 - eps to an earlier row of their cluster",
            type=float,
        ),
        ORDER,
    )
    enabled_by: ClassVar[tuple[str, ...]] = ("dedup_eps",)
    eps: float = 0.05
    order: str = "hard"
    rule: str = "reference"
    block_size: int | None = None

    def check(self) -> None:
        super().check()
        in_range(self.label("eps"), self.eps, 0.0, 2.0, lo_open=True, hi_open=True)
        if self.block_size is not None:
            positive_int(self.label("block_size"), self.block_size)

    @property
    def runs_per_cluster(self) -> bool:
        """Hard/easy walks order each cluster by its own similarities; a random walk draws one
        permutation over all rows, so its clusters are not independent."""
        return self.order in ("hard", "easy")

    def merge_clusters(self, clustering, keep, scores):
        from dataprune import Selection

        stats = pd.DataFrame(
            {
                "cluster": np.arange(clustering.k),
                "size": clustering.sizes,
                "kept": np.bincount(clustering.labels[keep], minlength=clustering.k),
                "eps": float(self.eps),
            }
        )
        return Selection.from_mask(keep, "duplicate", scores=scores, stats={"semdedup": stats})

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
    flags: ClassVar[tuple[Flag, ...]] = (
        KEEP,
        Flag(
            "--temperature",
            "temperature",
            "DBP softmax temperature (default {default}, as the reference code; a reimplementation uses 0.1)",
            type=float,
        ),
        Flag("--n-neighbors", "n_neighbors", "DBP neighbours for d_inter (default {default})", type=int),
        Flag("--balance", "balance", "DBP per-cluster floor share (default {default})", type=float),
        ORDER,
    )
    keep: float | int = 0.3
    temperature: float = 0.5
    n_neighbors: int = 20
    balance: float = 0.0
    order: str = "hard"
    min_per_cluster: int = 1
    seed: int = 1234

    def check(self) -> None:
        super().check()
        in_range(self.label("temperature"), self.temperature, 0.0, math.inf, lo_open=True, hi_open=True)
        positive_int(self.label("n_neighbors"), self.n_neighbors)
        in_range(self.label("balance"), self.balance, 0.0, 1.0)
        positive_int(self.label("min_per_cluster"), self.min_per_cluster, 0)

    def run(self, rows, clustering, texts=None, *, device="auto", progress=False):
        from dataprune import dbp

        params = dataclasses.asdict(self)
        return dbp(rows, params.pop("keep"), clustering=clustering, device=device, **params)


@register_step
@dataclass(frozen=True)
class SSPStep(Step):
    """Self-supervised prototype pruning: keep the hardest (or easiest) rows by centroid distance."""

    method: ClassVar[str] = "ssp"
    flags: ClassVar[tuple[Flag, ...]] = (
        KEEP,
        ORDER,
        Flag("--ssp-mode", "order", "deprecated: use --order", choices=SSP_ORDERS, replaced_by="--order"),
    )
    renamed: ClassVar[dict[str, str]] = {"mode": "order"}
    keep: float | int = 0.5
    order: str = "hard"

    def check(self) -> None:
        super().check()
        if self.order not in SSP_ORDERS:
            raise ValueError(
                f"ssp order must be one of {SSP_ORDERS}, got {self.order!r} (a random subset is --method random)"
            )

    def run(self, rows, clustering, texts=None, *, device="auto", progress=False):
        from dataprune import ssp

        return ssp(rows, self.keep, clustering=clustering, order=self.order)


@register_step
@dataclass(frozen=True)
class RandomStep(Step):
    """A seeded uniform random subset."""

    method: ClassVar[str] = "random"
    flags: ClassVar[tuple[Flag, ...]] = (KEEP,)
    keep: float | int = 0.5
    seed: int = 1234

    def run(self, rows, clustering, texts=None, *, device="auto", progress=False):
        from dataprune import random_subset

        return random_subset(rows.shape[0], self.keep, seed=self.seed)


def build_step(step: dict) -> Step:
    """``{"method": name, **params}`` -> the checked step object (unknown names/params and
    bad values raise ValueError)."""
    params = dict(step)
    method = params.pop("method", None)
    cls = STEPS.lookup(method)
    for old, new in cls.renamed.items():
        if old in params:
            warn_renamed(f"the {method} step parameter {old!r}", repr(new), stacklevel=4)
            params.setdefault(new, params.pop(old))
    unknown = set(params) - set(cls.defaults())
    if unknown:
        raise ValueError(f"unknown parameter(s) {sorted(unknown)} for {method}")
    return cls(**params)


def normalize_steps(steps: Sequence[dict]) -> list[dict]:
    """Fill defaults and check step names/params. A step is ``{"method": name, ...params}``."""
    return [build_step(step).as_dict() for step in steps]


def recorded_steps(steps: Sequence[dict]) -> list[dict]:
    """The normalized ``steps`` as runs record and fingerprint them (:meth:`Step.record`)."""
    return [build_step(step).record() for step in steps]


def run_step(step: dict, rows, clustering: Clustering, texts=None, *, device="auto", progress=False):
    """One selection step over ``rows`` (m, d) with their clustering: a Selection (m,)."""
    return build_step(step).run(rows, clustering, texts, device=device, progress=progress)


def method_choices() -> list[str]:
    """``--method`` choices: the registered steps offered as a method, those picked by
    ``--method`` alone first (``dbp, ssp, random, semdedup``), in registration order."""
    offered = [name for name, cls in STEPS.items() if cls.method_choice]
    return sorted(offered, key=lambda name: bool(STEPS[name].enabled_by))


def chain_steps() -> list[str]:
    """Steps that their own flags add before the method step (``clipscore, semdedup``)."""
    return [name for name, cls in STEPS.items() if cls.enabled_by]


def cli_flags() -> list[tuple[Flag, str]]:
    """Every step flag once, with its help's ``{default}`` filled: the flags that add a chain
    step first (in :func:`chain_steps` order), then the others in :func:`method_choices` order."""
    order = method_choices() + [m for m in chain_steps() if m not in method_choices()]
    owners: dict[str, list[str]] = {}
    flags: dict[str, Flag] = {}
    for name in order:
        for flag in STEPS[name].flags:
            if flags.setdefault(flag.name, flag) is not flag:
                raise ValueError(f"two different step flags are named {flag.name}: share one Flag object")
            owners.setdefault(flag.name, []).append(name)
    first = [f for m in chain_steps() for f in STEPS[m].flags if f.dest in STEPS[m].enabled_by]
    ordered = first + [f for f in flags.values() if f not in first]
    return [(flag, flag.help.format(default=flag_default(flag, owners[flag.name]))) for flag in ordered]


def flag_params(cls: type[Step], values: dict) -> dict:
    """``{param: value}`` of step class ``cls`` from its flags' values in ``values`` (by dest)."""
    return {f.param: values[f.dest] for f in cls.flags if f.dest in values}


def flag_default(flag: Flag, methods: Sequence[str]) -> str:
    """The default of ``flag`` in steps ``methods``: ``"hard"``, or ``"dbp 0.3, ssp 0.5"`` when they differ."""
    values = {m: STEPS[m].defaults()[flag.param] for m in methods}
    if len(set(map(repr, values.values()))) == 1:
        return str(next(iter(values.values())))
    return ", ".join(f"{m} {v}" for m, v in values.items())


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
