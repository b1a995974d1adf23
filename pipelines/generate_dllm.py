"""Generate with a masked diffusion LLM (LLaDA, Dream, ...) and a parallel-decoding rule.

Thin adapter around :func:`tokenprune.localleap.localleap_generate`: it loads a LLaDA or
Dream checkpoint folder natively (:func:`tokenprune.load_dllm`, no remote code) or takes a
loaded model, turns a prompt (or a chat ``messages`` list, or a batch of prompts) into ids with
the tokenizer, finds the mask and EOS ids from the tokenizer/config, runs the loop and decodes.
It returns a :class:`tokenprune.Generation` (a :class:`DiffusionGeneration`).

    >>> out = dllm_generate("path/to/LLaDA-8B-Instruct", "What is 12*7?", gen_length=128)
    >>> out.texts[0], out.stats.forward_passes, out.stats.extras["tokens_per_forward"]
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from prunecore.deprecation import warn_renamed as deprecated
from tokenprune.generation import Generation, decode_continuations
from tokenprune.localleap import RULES, load_dllm, localleap_generate
from tokenprune.localleap.models import NativeDLLM
from tokenprune.stats import TokenStats

__all__ = ["DiffusionGeneration", "DLLMStats", "resolve_mask_id", "resolve_eos_id", "resolve_pad_id", "dllm_generate"]


#: the old ``DLLMGeneration.stats`` dict keys that are read from another extras key
OLD_STATS_KEYS = {"row_nfe": "nfe_per_row"}


@dataclass
class DLLMStats(TokenStats):
    """The loop's :class:`~tokenprune.stats.TokenStats` (``forward_passes`` = NFE) whose
    ``extras`` add ``nfe``, ``nfe_per_row`` (list), ``block_nfe`` (list) and ``gen_length`` to
    the loop's ``row_nfe`` (sum over rows), ``tokens_per_forward``, ``rule``, ``cache`` and
    ``positions_computed``. ``stats["nfe"]`` (the old dict) is a deprecated spelling of
    ``stats.extras["nfe"]`` (``stats["row_nfe"]``: the per-row list, ``extras["nfe_per_row"]``)."""

    def __getitem__(self, key: str):
        new = OLD_STATS_KEYS.get(key, key)
        deprecated(f"stats[{key!r}]", f"stats.extras[{new!r}]")
        return self.extras[new]


@dataclass
class DiffusionGeneration(Generation):
    """What :func:`dllm_generate` returns: a :class:`~tokenprune.Generation` (``sequences`` =
    left-padded prompt + generated canvas, ``texts``, ``stats`` a :class:`DLLMStats`).

    The old ``DLLMGeneration`` spellings are deprecated properties: ``text`` (``texts[0]`` for
    a single prompt, else ``texts``), ``ids`` (``generated``), ``token_stats`` (``stats``).
    """

    single: bool = False

    @property
    def text(self) -> str | list[str]:
        deprecated("DLLMGeneration.text", "result.texts")
        return self.texts[0] if self.single else self.texts

    @property
    def ids(self) -> torch.Tensor:
        deprecated("DLLMGeneration.ids", "result.generated (result.sequences holds the prompt too)")
        return self.generated

    @property
    def token_stats(self) -> TokenStats:
        deprecated("DLLMGeneration.token_stats", "result.stats")
        return self.stats


if TYPE_CHECKING:
    DLLMGeneration = DiffusionGeneration  # deprecated alias, resolved (with a warning) by __getattr__


def __getattr__(name: str):
    if name == "DLLMGeneration":
        deprecated("pipelines.generate_dllm.DLLMGeneration", "tokenprune.Generation (DiffusionGeneration)")
        return DiffusionGeneration
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _sources(model, tokenizer):
    cfg = getattr(model, "config", None)
    gen_cfg = getattr(model, "generation_config", None)
    return [tokenizer, cfg, gen_cfg]


def resolve_mask_id(model, tokenizer=None, mask_id: int | None = None) -> int:
    """The mask token id: explicit > ``tokenizer.mask_token_id`` > ``config.mask_token_id`` >
    ``generation_config.mask_token_id``; for a native LLaDA/Dream the checkpoint's config comes
    first. Raises ValueError when none has one."""
    if mask_id is not None:
        return int(mask_id)
    native = getattr(model, "config", None) if isinstance(model, NativeDLLM) else None
    for src in [native, *_sources(model, tokenizer)]:
        val = getattr(src, "mask_token_id", None) if src is not None else None
        if val is not None:
            return int(val)
    raise ValueError(
        "this model has no mask token: neither the tokenizer nor model.config / "
        "generation_config defines mask_token_id. A masked diffusion LM (LLaDA, Dream) is "
        "needed; pass mask_id=... explicitly if you know it."
    )


def resolve_eos_id(model, tokenizer=None, eos_id: int | None = None) -> int | None:
    """EOS id: explicit > tokenizer > config > generation_config (first of a list), or None."""
    if eos_id is not None:
        return int(eos_id)
    for src in _sources(model, tokenizer):
        val = getattr(src, "eos_token_id", None) if src is not None else None
        if isinstance(val, (list, tuple)):
            val = val[0] if val else None
        if val is not None:
            return int(val)
    return None


def resolve_pad_id(tokenizer, eos_id: int | None, mask_id: int) -> int:
    """The id that left-pads prompts: the tokenizer's pad id, else EOS, else the mask id."""
    pad = getattr(tokenizer, "pad_token_id", None)
    return pad if pad is not None else (eos_id if eos_id is not None else mask_id)


def _encode(tokenizer, prompt, chat: bool | None):
    is_messages = isinstance(prompt, list) and prompt and isinstance(prompt[0], dict)
    if is_messages or (chat and isinstance(prompt, str)):
        if not hasattr(tokenizer, "apply_chat_template"):
            raise TypeError("messages need a tokenizer with apply_chat_template")
        msgs = prompt if is_messages else [{"role": "user", "content": prompt}]
        ids = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)
    if isinstance(prompt, str):
        return list(tokenizer.encode(prompt))
    raise TypeError(f"prompt must be a str or a list of chat messages, got {type(prompt)}")


def dllm_generate(
    model_or_path,
    prompts,
    *legacy,
    tokenizer=None,
    rule: str = "localleap",
    gen_length: int = 256,
    block_length: int = 32,
    mask_id: int | None = None,
    eos_id: int | None = None,
    chat: bool | None = None,
    skip_special_tokens: bool = True,
    device="auto",
    dtype="auto",
    **kwargs,
) -> DiffusionGeneration:
    """Generate text from a dLLM with a parallel-decoding rule.

    Args:
        model_or_path: a LLaDA / Dream checkpoint folder (loaded natively with
            :func:`tokenprune.load_dllm` on ``device`` in ``dtype``), or a loaded masked
            diffusion LM (``model(input_ids, attention_mask) -> .logits``).
        prompts: a str, a list of chat messages (``[{"role": ..., "content": ...}]``), or a
            list of those for a batch (left-padded).
        tokenizer: its tokenizer (``encode``/``decode``; ``apply_chat_template`` for chats);
            None = the folder's. The old order ``dllm_generate(model, tokenizer, prompts)``
            (three positionals) still works for one release, with a ``DeprecationWarning``.
        rule: ``"localleap"``, ``"fastdllm"``, ``"llada"`` or ``"eb"`` (or a callable).
        gen_length, block_length: canvas and block sizes (defaults 256 / 32).
        mask_id, eos_id: override what the tokenizer/config say.
        chat: wrap a str prompt in the chat template (default: no).
        **kwargs: passed to :func:`localleap_generate` (``rule_options`` or its fields
            threshold, relaxed_threshold, radius, gamma, steps, remasking; temperature, top_p,
            top_k, cfg_scale, early_stop, use_cache, shift_logits, generator). Native models bring
            their own logit shift; a loaded model with ``config.model_type == "dream"`` gets ``shift_logits=True``.
    Returns:
        :class:`DiffusionGeneration`: ``sequences`` ``(B, P + gen_length)``, ``texts`` (one per
        prompt, each stopped at the first EOS), ``stats`` (:class:`DLLMStats`: ``forward_passes``
        = NFE; ``extras`` ``nfe``, ``nfe_per_row``, ``block_nfe``, ``tokens_per_forward``,
        ``gen_length``, ``rule``, ``cache``, ...), ``prompt_length`` ``P``.
    """
    if legacy:
        if len(legacy) > 1 or tokenizer is not None:
            raise TypeError(
                "dllm_generate(model_or_path, prompts, *, tokenizer=None, ...) takes two positional arguments"
            )
        deprecated("dllm_generate(model, tokenizer, prompts)", "dllm_generate(model, prompts, tokenizer=tokenizer)")
        tokenizer, prompts = prompts, legacy[0]
    if isinstance(rule, str) and rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; expected one of {RULES}")
    model = model_or_path
    if isinstance(model_or_path, (str, Path)):
        model, folder_tokenizer = load_dllm(model_or_path, device=device, dtype=dtype)
        tokenizer = tokenizer if tokenizer is not None else folder_tokenizer
    if tokenizer is None:
        raise ValueError("no tokenizer: pass tokenizer=..., or a checkpoint folder that ships its tokenizer files")
    mid = resolve_mask_id(model, tokenizer, mask_id)
    eid = resolve_eos_id(model, tokenizer, eos_id)
    batch = isinstance(prompts, (list, tuple)) and prompts and not isinstance(prompts[0], dict)
    encoded = [_encode(tokenizer, p, chat) for p in (list(prompts) if batch else [prompts])]
    pad = resolve_pad_id(tokenizer, eid, mid)
    cfg = getattr(model, "config", None)
    if not hasattr(model, "shift_logits") and str(getattr(cfg, "model_type", "")).lower() == "dream":
        kwargs.setdefault("shift_logits", True)  # Dream predicts token i from the logits at i - 1
    res = localleap_generate(
        model,
        encoded,
        gen_length=gen_length,
        block_length=block_length,
        mask_id=mid,
        rule=rule,
        eos_id=eid,
        pad_id=pad,
        **kwargs,
    )
    eos = [] if eid is None else [eid]
    texts = decode_continuations(tokenizer, res.generated, eos, skip_special_tokens=skip_special_tokens)
    loop = res.stats
    extras = {
        **loop.extras,
        "nfe": res.nfe,
        "nfe_per_row": res.row_nfe.tolist(),
        "block_nfe": res.block_nfe,
        "gen_length": gen_length,
    }
    stats = DLLMStats(loop.method, loop.tokens_in, loop.tokens_kept, loop.forward_passes, extras)
    return DiffusionGeneration(res.ids, texts, stats, res.prompt_length, single=not batch)
