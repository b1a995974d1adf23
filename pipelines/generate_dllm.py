"""Generate with a masked diffusion LLM (LLaDA, Dream, ...) and a parallel-decoding rule.

Thin adapter around :func:`tokenprune.localleap.localleap_generate`: it loads a LLaDA or
Dream checkpoint folder natively (:func:`tokenprune.load_dllm`, no remote code) or takes a
loaded model, turns a prompt (or a chat ``messages`` list, or a batch of prompts) into ids with
the tokenizer, finds the mask and EOS ids from the tokenizer/config, runs the loop and decodes.

    >>> out = dllm_generate("path/to/LLaDA-8B-Instruct", None, "What is 12*7?", gen_length=128)
    >>> out.text, out.stats["nfe"], out.stats["tokens_per_forward"]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from tokenprune.localleap import RULES, load_dllm, localleap_generate
from tokenprune.localleap.models import NativeDLLM
from tokenprune.stats import TokenStats

__all__ = ["DLLMGeneration", "resolve_mask_id", "resolve_eos_id", "dllm_generate"]


@dataclass
class DLLMGeneration:
    """``text`` (str, or list for a batch), ``ids`` (B, gen_length), ``stats`` and ``token_stats``.

    ``stats``: ``nfe``, ``row_nfe`` (list), ``block_nfe`` (list), ``tokens_per_forward``,
    ``gen_length``, ``rule``, ``cache``. ``token_stats``: the loop's
    :class:`~tokenprune.stats.TokenStats` (positions generated, tokens committed, NFE).
    """

    text: str | list
    ids: torch.Tensor
    stats: dict = field(default_factory=dict)
    token_stats: TokenStats | None = None


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
    tokenizer,
    prompts,
    *,
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
) -> DLLMGeneration:
    """Generate text from a dLLM with a parallel-decoding rule.

    Args:
        model_or_path: a LLaDA / Dream checkpoint folder (loaded natively with
            :func:`tokenprune.load_dllm` on ``device`` in ``dtype``), or a loaded masked
            diffusion LM (``model(input_ids, attention_mask) -> .logits``).
        tokenizer: its tokenizer (``encode``/``decode``; ``apply_chat_template`` for chats);
            None = the folder's.
        prompts: a str, a list of chat messages (``[{"role": ..., "content": ...}]``), or a
            list of those for a batch (left-padded).
        rule: ``"localleap"``, ``"fastdllm"``, ``"llada"`` or ``"eb"`` (or a callable).
        gen_length, block_length: canvas and block sizes (defaults 256 / 32).
        mask_id, eos_id: override what the tokenizer/config say.
        chat: wrap a str prompt in the chat template (default: no).
        **kwargs: passed to :func:`localleap_generate` (threshold, relaxed_threshold, radius,
            gamma, steps, temperature, top_p, top_k, remasking, cfg_scale, early_stop,
            use_cache, shift_logits, generator). Native models bring their own logit shift;
            a loaded model with ``config.model_type == "dream"`` gets ``shift_logits=True``.
    Returns:
        :class:`DLLMGeneration`; the text stops at the first EOS.
    """
    if isinstance(rule, str) and rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; expected one of {RULES}")
    model = model_or_path
    if isinstance(model_or_path, (str, Path)):
        model, folder_tokenizer = load_dllm(model_or_path, device=device, dtype=dtype)
        tokenizer = tokenizer if tokenizer is not None else folder_tokenizer
    if tokenizer is None:
        raise ValueError("no tokenizer: pass one, or a checkpoint folder that ships its tokenizer files")
    mid = resolve_mask_id(model, tokenizer, mask_id)
    eid = resolve_eos_id(model, tokenizer, eos_id)
    batch = isinstance(prompts, (list, tuple)) and prompts and not isinstance(prompts[0], dict)
    encoded = [_encode(tokenizer, p, chat) for p in (list(prompts) if batch else [prompts])]
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = pad if pad is not None else (eid if eid is not None else mid)
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
    gen = res.generated
    texts = []
    for row in gen.tolist():  # one decode per sequence
        if eid is not None and eid in row:
            row = row[: row.index(eid)]
        texts.append(tokenizer.decode(row, skip_special_tokens=skip_special_tokens))
    stats = {
        "nfe": res.nfe,
        "row_nfe": res.row_nfe.tolist(),
        "block_nfe": res.block_nfe,
        "tokens_per_forward": res.tokens_per_forward,
        "gen_length": gen_length,
        "rule": res.stats.extras["rule"],
        "cache": res.stats.extras["cache"],
    }
    return DLLMGeneration(text=texts if batch else texts[0], ids=gen, stats=stats, token_stats=res.stats)
