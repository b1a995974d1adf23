"""FTP-routed ``generate`` for transformers decoder-only LLMs (thin adapter).

``ftp_generate(model_or_path, prompts, keep=..., router=...)`` loads the model (by local
path or hub name through transformers, never with remote code), attaches FTP
(:mod:`tokenprune.ftp`), generates, detaches, and returns a :class:`tokenprune.Generation`:
the sequences (prompt included), the texts and one :class:`~tokenprune.stats.TokenStats`
(achieved sparsity per block, prefill and decode separately, and the FLOPs saved in the
decoder layers' linear maps).
"""

from __future__ import annotations

import numbers
import warnings
from pathlib import Path

import torch

from prunecore.budget import keep_from_sparsity
from tokenprune.generation import Generation
from tokenprune.stats import TokenStats


class DeprecatedFTPGenerateResult(Generation):
    """``FTPGenerateResult(texts, sequences, stats)``: deprecated, a :class:`~tokenprune.Generation`."""

    def __init__(self, texts, sequences, stats=None):
        warnings.warn(
            "FTPGenerateResult is deprecated: ftp_generate returns a tokenprune.Generation "
            "(same texts / sequences / stats fields)",
            DeprecationWarning,
            stacklevel=2,
        )
        super().__init__(sequences=sequences, texts=texts, stats=stats if stats is not None else TokenStats("ftp"))


def __getattr__(name: str):
    if name == "FTPGenerateResult":
        warnings.warn(
            "pipelines.generate_llm.FTPGenerateResult is deprecated: use tokenprune.Generation",
            DeprecationWarning,
            stacklevel=2,
        )
        return DeprecatedFTPGenerateResult
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load_causal_lm(
    model_or_path,
    *,
    gguf_file: str | None = None,
    tokenizer=None,
    dtype="auto",
    device: str | None = "auto",
    attn_implementation: str = "sdpa",
):
    """(model, tokenizer) from a loaded model or a name/path; ``trust_remote_code`` stays off.

    Loading goes through :func:`prunecore.models.load_transformers` / ``load_tokenizer``
    (device and precision resolved there: ``dtype="auto"`` is bf16 on CUDA, fp32 on CPU);
    ``gguf_file`` names a GGUF file inside the folder (dequantised by transformers).
    """
    from prunecore.models import load_tokenizer, load_transformers

    if isinstance(model_or_path, torch.nn.Module):
        model = model_or_path
        if tokenizer is None:
            name = getattr(model.config, "_name_or_path", None)
            if not name or not Path(str(name)).exists():
                raise ValueError("pass tokenizer= when giving a model object without a local path")
            tokenizer = load_tokenizer(name)
        return model, tokenizer
    gguf = {"gguf_file": gguf_file} if gguf_file else {}
    model = load_transformers(
        model_or_path,
        auto_class="AutoModelForCausalLM",
        device=device,
        dtype=dtype,
        attn_implementation=attn_implementation,
        **gguf,
    )
    if tokenizer is None:
        tokenizer = load_tokenizer(model_or_path, **gguf)
    return model, tokenizer


def resolve_router(router, keep=None, schedule=None):
    """``(router, keep, schedule)``: a router object from a name or a saved file, and its budget.

    Exactly one of ``keep`` / ``schedule`` (the sparsity alias) comes back non-None. A router
    file's stored schedules (sparsities keyed by the target sparsity, ``"0.30"``) are used when
    no budget is given or a scalar fraction matches a stored key (``keep=0.7`` matches ``"0.30"``).
    """
    from tokenprune.ftp import RandomRouter, StaticRouter, TokenRouter

    if keep is not None and schedule is not None:
        raise ValueError("pass keep or its alias schedule= (a sparsity), not both (keep = 1 - sparsity)")
    if isinstance(router, str) and router in ("static", "random"):
        r = StaticRouter() if router == "static" else RandomRouter(0)
    elif isinstance(router, (str, Path)):
        r = TokenRouter.load(router)
        extra = TokenRouter.load_extra(router).get("schedules", {})
        given = schedule if schedule is not None else keep
        if given is None and extra:
            keep, schedule = None, next(iter(extra.values()))
        elif isinstance(given, numbers.Real) and not isinstance(given, numbers.Integral):
            key = f"{float(schedule if schedule is not None else keep_from_sparsity(keep)):.2f}"
            if key in extra:
                keep, schedule = None, extra[key]
    else:
        r = router
    if keep is None and schedule is None:
        raise ValueError(
            "give keep (fraction of tokens each block computes, or an int count per row) "
            "or its alias schedule= (sparsity)"
        )
    return r, keep, schedule


def ftp_generate(
    model_or_path,
    prompts,
    *,
    tokenizer=None,
    keep=None,
    router="static",
    schedule=None,
    gguf_file: str | None = None,
    max_new_tokens: int = 32,
    chat: bool = False,
    do_sample: bool = False,
    allow_full: bool = False,
    nested: bool = False,
    **generate_kwargs,
) -> Generation:
    """Load a causal LM, attach FTP, generate, and report routing statistics.

    Args:
        model_or_path: a loaded ``*ForCausalLM`` or a local path / name for transformers.
        prompts: a string or a list of strings (batched with left padding).
        tokenizer: needed with a model object that has no local path.
        keep: the budget of each block: fraction of tokens it computes or an int count of each
            row's tokens (uniform, or one per decoder layer).
        router: ``"static"``, ``"random"``, a :class:`~tokenprune.ftp.TokenRouter`, or the path of
            a router ``.safetensors`` file (its stored schedules are used when no budget is
            given or a scalar fraction matches a stored target).
        schedule: sparsity, the keyword alias of ``keep`` (``keep = 1 - sparsity``): a float
            (uniform) or one sparsity per decoder layer; give ``keep`` or ``schedule``, not both.
        chat: wrap each prompt with the tokenizer's chat template.
        allow_full, nested: as in :func:`tokenprune.ftp.attach_ftp` (``nested=True``: no re-entry
            of skipped tokens; recommended for learned routers, see ``docs/ftp.md``).
        **generate_kwargs: passed to ``model.generate``.
    Returns:
        :class:`tokenprune.Generation`: ``sequences`` (prompt included), ``texts`` (the generated
        part), ``prompt_length`` and ``stats``, the handle's :class:`~tokenprune.stats.TokenStats`
        read once after ``generate`` (``tokens_in``/``tokens_kept``: token-block pairs routed /
        computed, prefill and decode; ``forward_passes``: forward passes of the routed model,
        one per generation step), with ``extras["prefill"]``, ``extras["decode"]`` (per-block
        sparsity, tokens, FLOPs saved), ``extras["target_per_block"]`` (sparsities) and
        ``extras["keep_per_block"]``. Decode counts stop at a row's end-of-sequence token (a
        finished row of a batch keeps being fed padding by ``generate``; those steps are not
        counted). With beam search every beam's tokens count (the compute spent).
    """
    from tokenprune.ftp import attach_ftp

    model, tok = load_causal_lm(model_or_path, gguf_file=gguf_file, tokenizer=tokenizer)
    single = isinstance(prompts, str)
    prompts = [prompts] if single else list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise TypeError("prompts must be a string or a non-empty list of strings")
    if chat:
        prompts = [
            tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in prompts
        ]
    old_side = tok.padding_side
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    try:
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=not chat)
    finally:
        tok.padding_side = old_side
    r, keep, schedule = resolve_router(router, keep, schedule)
    stop = generate_kwargs.get("eos_token_id", getattr(getattr(model, "generation_config", None), "eos_token_id", None))
    with attach_ftp(model, r, keep, schedule=schedule, allow_full=allow_full, nested=nested) as handle:
        handle.set_stop_tokens(stop if stop is not None else tok.eos_token_id)
        with torch.no_grad():
            seq = handle.model.generate(
                **enc.to(model.device),
                max_new_tokens=max_new_tokens,
                do_sample=do_sample,
                pad_token_id=tok.pad_token_id,
                **generate_kwargs,
            )
        counts = handle.stats
    stats = TokenStats(counts.method, counts.tokens_in, counts.tokens_kept, counts.forward_passes, counts.extras)
    T0 = enc["input_ids"].shape[1]
    texts = tok.batch_decode(seq[:, T0:], skip_special_tokens=True)
    return Generation(sequences=seq, texts=texts, stats=stats, prompt_length=T0)
