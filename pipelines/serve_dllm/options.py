"""The decoding options of a served request and their validation (what ``localleap_generate`` would refuse)."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from tokenprune.localleap.generate import CACHE_MODES
from tokenprune.localleap.rules import RULES, check_threshold

__all__ = ["DecodeOptions", "check_options", "gen_length_for"]


@dataclass(frozen=True)
class DecodeOptions:
    """The decoding options of one request (the server's defaults, overridable per request).

    ``rule`` / ``threshold`` / ``relaxed_threshold`` / ``radius`` / ``gamma`` / ``steps``
    mean what they mean in :func:`localleap_generate` (``steps``: LLaDA's total steps over the
    request's ``gen_length``, default one token per step); ``cache`` is ``"none"``, ``"prefix"``
    or ``"dual"``; ``temperature`` / ``top_p`` / ``top_k`` are the sampling options.
    """

    rule: str = "localleap"
    threshold: float = 0.9
    relaxed_threshold: float = 0.75
    radius: int = 4
    gamma: float = 1e-3
    steps: int | None = None
    block_length: int = 32
    cache: str = "none"
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None

    def with_overrides(self, **values) -> DecodeOptions:
        """A copy with the non-None ``values`` replaced."""
        return replace(self, **{k: v for k, v in values.items() if v is not None})

    def batch_key(self) -> tuple:
        """Rows share a batch only when their blocks and caches have the same shape."""
        return (self.block_length, self.cache)

    def generate_kwargs(self) -> dict:
        """The keyword arguments of ``localleap_generate`` / ``dllm_generate`` these options mean."""
        return {
            "rule": self.rule,
            "threshold": self.threshold,
            "relaxed_threshold": self.relaxed_threshold,
            "radius": self.radius,
            "gamma": self.gamma,
            "steps": self.steps,
            "block_length": self.block_length,
            "use_cache": False if self.cache == "none" else self.cache,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
        }


def gen_length_for(max_tokens: int, block_length: int) -> int:
    """The canvas length of a request: ``max_tokens`` rounded up to whole blocks."""
    if block_length <= 0:
        raise ValueError(f"block_length must be positive, got {block_length}")
    return math.ceil(max_tokens / block_length) * block_length


def check_options(opts: DecodeOptions, gen_length: int, *, dual_ok: bool = True) -> None:
    """Raise a ValueError naming the first option ``localleap_generate`` would refuse."""
    if opts.rule not in RULES:
        raise ValueError(f"rule must be one of {list(RULES)}, got {opts.rule!r}")
    check_threshold("threshold", opts.threshold)
    check_threshold("relaxed_threshold", opts.relaxed_threshold)
    if opts.rule == "localleap" and opts.relaxed_threshold > opts.threshold:
        raise ValueError("relaxed_threshold must be <= threshold")
    if opts.radius < 0:
        raise ValueError(f"radius must be >= 0, got {opts.radius}")
    if opts.gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {opts.gamma}")
    if opts.block_length <= 0:
        raise ValueError(f"block_length must be positive, got {opts.block_length}")
    if opts.cache not in CACHE_MODES:
        raise ValueError(f"cache must be one of {list(CACHE_MODES)}, got {opts.cache!r}")
    if opts.cache == "dual" and not dual_ok:
        raise ValueError("cache='dual' needs a native LLaDA/Dream model (replace_position)")
    if opts.temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {opts.temperature}")
    if opts.top_p is not None and not 0.0 < opts.top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {opts.top_p}")
    if opts.top_k is not None and opts.top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {opts.top_k}")
    if opts.rule == "llada":
        blocks = gen_length // opts.block_length
        steps = gen_length if opts.steps is None else opts.steps
        if steps < blocks or steps % blocks:
            raise ValueError(
                f"steps ({steps}) must be a positive multiple of the number of blocks ({blocks}) "
                f"of this request (max_tokens rounded up to block_length {opts.block_length})"
            )
