"""The user API: :func:`fopru_generate` and the :class:`FoPru` context manager.

Both find the model's family adapter by ``config.model_type`` (one clear ``TypeError`` naming
the supported families otherwise) and return / record one :class:`~tokenprune.stats.TokenStats`
per call (``method="fopru"``; ``tokens_in``/``tokens_kept`` = visual tokens of all images;
``forward_passes`` = vision-tower encodings FoPru ran; ``extras``: per-image and per-prompt
counts, ``kept_indices``, family-specific counts).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
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
            :func:`tokenprune.fopru_select`; ``layer=None`` — the vision layer (``hidden_states``
            index) whose attention scores the tokens, None = the family default (LLaVA:
            ``vision_feature_layer``; Qwen2-VL: -2; Qwen2.5-VL: its last full-attention block);
            ``method`` — ``"cls"`` or ``"colmean"``, None = the family default (``"cls"`` for
            CLIP towers, ``"colmean"`` for CLS-free towers); ``feature_passing="auto"``; ``restore_prompt=True`` —
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
    and ``forward`` are wrapped (the class is untouched); on exit (also on exception) all three
    are undone. Inside the context:

    * ``model.generate(**inputs)`` with images generates on the pruned prompt;
    * ``model(**inputs)`` with images (what log-likelihood evaluation harnesses call) runs the
      same pruned prefill: its outputs cover the shrunk prompt (``logits`` ``(B, L', V)``,
      ``labels`` shrunk alike), equal to the first step of the pruned ``generate``;
    * calls without images run unchanged; inputs the family cannot prune (e.g. videos) raise.

    Each pruned call's stats are appended to :attr:`history`; the last one is :attr:`stats`.
    Keyword arguments are the options of :func:`fopru_generate`.
    """

    def __init__(self, model: nn.Module, **options):
        self.model = model
        self.adapter: FoPruAdapter = adapter_class(model)(model, **options)
        self.history: list[TokenStats] = []
        self._saved: dict[str, Any] = {}
        self._active = False

    @property
    def stats(self) -> TokenStats | None:
        return self.history[-1] if self.history else None

    def _wrap(self, name: str, pruned: Callable) -> None:
        """Replace the instance's ``name`` by a wrapper routing calls with images to ``pruned``."""
        m = self.model
        self._saved[name] = m.__dict__.get(name)
        orig = getattr(m, name)
        adapter = self.adapter

        @functools.wraps(orig)  # keeps the signature that transformers inspects
        def wrapper(*args, **kwargs):
            if len(args) > 1:
                raise TypeError(f"inside FoPru pass the inputs of {name}() by keyword (got {len(args)} positional)")
            if args:
                kwargs = {"input_ids": args[0], **kwargs}
            if not adapter.has_visual(kwargs):  # text-only call: nothing to prune
                return orig(**kwargs)
            out, stats = pruned(kwargs, orig)
            self.history.append(stats)
            return out

        setattr(m, name, wrapper)

    def __enter__(self) -> FoPru:
        if self._active:
            raise RuntimeError("FoPru context is already active")
        self.adapter.attach()
        self._wrap("generate", lambda kwargs, orig: self.adapter.generate(kwargs, generate_fn=orig))
        self._wrap("forward", lambda kwargs, orig: self.adapter.forward(kwargs, forward_fn=orig))
        self._active = True
        return self

    def __exit__(self, *exc) -> bool:
        m = self.model
        try:
            self.adapter.remove()
        finally:
            for name, prev in self._saved.items():
                if prev is not None:
                    setattr(m, name, prev)
                else:
                    m.__dict__.pop(name, None)
            self._saved = {}
            self._active = False
        return False
