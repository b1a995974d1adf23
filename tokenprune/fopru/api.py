"""The user API: :func:`fopru_generate` and the :class:`FoPru` context manager.

Both find the model's family adapter by ``config.model_type`` (one clear ``TypeError`` naming
the supported families otherwise) and return / record one :class:`~tokenprune.stats.TokenStats`
per call (``method="fopru"``; ``tokens_in``/``tokens_kept`` = visual tokens of all images;
``forward_passes`` = the language model's forward calls during the call; ``extras``: per-image
and per-prompt counts, ``kept_indices``, ``vision_encodings`` (1 per call), family-specific
counts). :func:`fopru_generate` returns a :class:`~tokenprune.Generation`.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunecore.models import load_transformers
from tokenprune.generation import Generation, decode_continuations
from tokenprune.stats import TokenStats

from .adapters import FoPruAdapter, adapter_class
from .adapters.base import output_sequences

__all__ = ["FoPru", "FoPruGeneration", "fopru_generate"]


@dataclass
class FoPruGeneration(Generation):
    """A :class:`~tokenprune.Generation` plus ``output``: ``model.generate``'s own output
    object when it was asked for one (``return_dict_in_generate=True``: ``logits``, ``scores``
    ..., its ``sequences`` are :attr:`sequences`), else None. The deprecated tuple unpacking
    ``out, stats = fopru_generate(...)`` yields ``(output or sequences, stats)`` as before."""

    output: Any = None

    def __iter__(self):
        warnings.warn(
            "unpacking fopru_generate's result is deprecated and will be removed in the next release: "
            "use result.sequences (result.output for return_dict_in_generate=True) and result.stats",
            DeprecationWarning,
            stacklevel=2,
        )
        return iter((self.sequences if self.output is None else self.output, self.stats))


def fopru_generate(
    model_or_path,
    inputs: Mapping[str, Any],
    *,
    tokenizer=None,
    keep=0.25,
    kept_indices: Sequence[torch.Tensor] | None = None,
    **options,
) -> FoPruGeneration:
    """Generate with FoPru-pruned visual tokens.

    Args:
        model_or_path: an LVLM of a registered family (LLaVA, LLaVA-NeXT, Qwen2-VL, ...), or a
            local folder of one (loaded with :func:`prunecore.models.load_transformers`,
            ``AutoModelForImageTextToText``, no remote code; its processor decodes the texts).
        inputs: the processor's output mapping (``input_ids``, ``attention_mask``,
            ``pixel_values`` and the family's extras such as ``image_sizes``/``image_grid_thw``).
        tokenizer: a tokenizer or processor to decode :attr:`~tokenprune.Generation.texts`
            (None: the folder's processor, if any; else ``texts == []``).
        keep: a fraction in (0, 1] (``K = floor(keep * N + 0.5)``), an int count or one of
            those per image.
        kept_indices: bypass scoring with explicit per-image indices (baselines).
        **options: the FoPru options of :class:`~tokenprune.fopru.adapters.base.FoPruAdapter`
            (``strategy="rank"``, ``row_mode``, ``grid`` — see :func:`tokenprune.fopru_select`;
            ``layer=None`` — the vision layer (``hidden_states`` index) whose attention scores
            the tokens, None = the family default (LLaVA: ``vision_feature_layer``; Qwen2-VL: -2;
            Qwen2.5-VL: its last full-attention block); ``method`` — ``"cls"`` or ``"colmean"``,
            None = the family default (``"cls"`` for CLIP towers, ``"colmean"`` for CLS-free
            towers); ``feature_passing="auto"``; ``restore_prompt=True`` — sequences start with
            the caller's prompt, else with the shrunk prompt the LLM saw) and the family's own
            options (LLaVA-NeXT: ``anyres_norm``, ``newline``); everything else goes to
            ``model.generate``.

    Returns:
        :class:`FoPruGeneration`: ``sequences`` ``(B*R, P + T)`` (prompt included), ``texts``
        (the continuations, cut at the first EOS), ``stats`` (``forward_passes`` = the language
        model's forward calls; ``extras["vision_encodings"]``), ``prompt_length`` ``P`` and,
        with ``return_dict_in_generate=True``, ``output`` (``generate``'s output object).
    """
    model = model_or_path
    if isinstance(model_or_path, (str, Path)):
        model = load_transformers(model_or_path, auto_class="AutoModelForImageTextToText")
        tokenizer = tokenizer if tokenizer is not None else folder_processor(model_or_path)
    cls = adapter_class(model)
    names = cls.option_names()
    adapter_options = {k: options.pop(k) for k in list(options) if k in names}
    res = cls(model, keep=keep, **adapter_options).generate(inputs, kept_indices=kept_indices, **options)
    sequences = output_sequences(res.output)
    texts = []
    if tokenizer is not None:
        texts = decode_continuations(tokenizer, sequences[:, res.prompt_length :], eos_token_ids(model, tokenizer))
    output = None if isinstance(res.output, torch.Tensor) else res.output
    return FoPruGeneration(sequences, texts, res.stats, res.prompt_length, output=output)


def folder_processor(folder):
    """The folder's processor (``AutoProcessor``, no remote code), or None when it has none."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(str(folder), trust_remote_code=False)
    except (OSError, ValueError, TypeError, KeyError):
        return None


def eos_token_ids(model: nn.Module, tokenizer) -> list[int]:
    """End-of-sequence ids: the model's ``generation_config`` (one or a list), else the tokenizer's."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = getattr(getattr(tokenizer, "tokenizer", tokenizer), "eos_token_id", None)
    if eos is None:
        return []
    return [int(e) for e in eos] if isinstance(eos, (list, tuple)) else [int(eos)]


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
        self._wrap("generate", lambda kwargs, orig: self.adapter.generate(kwargs, generate_fn=orig)[:2])
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
