"""The user API: :func:`fopru_generate` and the :class:`FoPru` context manager.

Both find the model's family adapter by ``config.model_type`` (one clear ``TypeError`` naming
the supported families otherwise) and return / record one :class:`~tokenprune.stats.TokenStats`
per call (``method="fopru"``; ``tokens_in``/``tokens_kept`` = visual tokens of all images;
``forward_passes`` = vision-tower encodings FoPru ran; ``extras``: per-image and per-prompt
counts, ``kept_indices``, family-specific counts).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from tokenprune.stats import TokenStats

from .adapters import FoPruAdapter, adapter_class

__all__ = ["FoPru", "fopru_generate"]


def fopru_generate(
    model: nn.Module,
    processor_outputs: Mapping[str, Any],
    *,
    kept_indices: Sequence[torch.Tensor] | None = None,
    **kwargs,
) -> tuple[Any, TokenStats]:
    """Generate with FoPru-pruned visual tokens.

    Args:
        model: an LVLM of a registered family (LLaVA, LLaVA-NeXT, Qwen2-VL, ...).
        processor_outputs: the processor's output mapping (``input_ids``, ``attention_mask``,
            ``pixel_values`` and the family's extras such as ``image_sizes``/``image_grid_thw``).
        kept_indices: bypass scoring with explicit per-image indices (baselines).
        **kwargs: the FoPru options of :class:`~tokenprune.fopru.adapters.base.FoPruAdapter`
            (``keep=0.25`` — a fraction in (0, 1] (``K = floor(keep * N + 0.5)``), an int count
            or one of those per image; ``strategy="rank"``, ``row_mode``, ``grid`` — see
            :func:`tokenprune.fopru_select`; ``layer=-2`` — the vision layer (``hidden_states``
            index) whose attention scores the tokens, ``None`` = the family default;
            ``method="cls"|"colmean"``; ``feature_passing="auto"``; ``restore_prompt=True`` —
            return the caller's prompt followed by the new tokens) and the family's own options
            (LLaVA-NeXT: ``anyres_norm``, ``newline``); everything else goes to ``model.generate``.

    Returns:
        ``(sequences_or_generate_output, TokenStats)``.
    """
    cls = adapter_class(model)
    names = cls.option_names()
    options = {k: kwargs.pop(k) for k in list(kwargs) if k in names}
    return cls(model, **options).generate(processor_outputs, kept_indices=kept_indices, **kwargs)


class FoPru:
    """``with FoPru(model, keep=0.25) as fp: out = model.generate(**inputs)``.

    The family adapter is built at construction (an unsupported model or a bad option fails
    here). On enter the attention-capture hooks are attached and the *instance's* ``generate``
    is wrapped (the class is untouched); on exit (also on exception) both are undone. A call
    without images runs unchanged. Each pruned call's stats are appended to :attr:`history`;
    the last one is :attr:`stats`. Keyword arguments are those of :func:`fopru_generate`.
    """

    def __init__(self, model: nn.Module, **options):
        self.model = model
        self.adapter: FoPruAdapter = adapter_class(model)(model, **options)
        self.history: list[TokenStats] = []
        self._had_generate = False
        self._prev_generate = None
        self._active = False

    @property
    def stats(self) -> TokenStats | None:
        return self.history[-1] if self.history else None

    def __enter__(self) -> FoPru:
        if self._active:
            raise RuntimeError("FoPru context is already active")
        m = self.model
        self._had_generate = "generate" in m.__dict__
        self._prev_generate = m.__dict__.get("generate")
        orig = m.generate
        adapter = self.adapter

        def generate(*args, **kwargs):
            if args:
                kwargs = {"input_ids": args[0], **kwargs}
            if not adapter.has_visual(kwargs):  # text-only call: nothing to prune
                return orig(**kwargs)
            out, stats = adapter.generate(kwargs, generate_fn=orig)
            self.history.append(stats)
            return out

        adapter.attach()
        m.generate = generate
        self._active = True
        return self

    def __exit__(self, *exc) -> bool:
        m = self.model
        try:
            self.adapter.remove()
        finally:
            if self._had_generate:
                m.generate = self._prev_generate
            else:
                m.__dict__.pop("generate", None)
            self._active = False
        return False
