"""FTP-routed ``generate`` for transformers decoder-only LLMs (thin adapter).

``ftp_generate(model_or_path, prompts, router=..., schedule=...)`` loads the model (by local
path or hub name through transformers, never with remote code), attaches FTP
(:mod:`tokenprune.ftp`), generates, detaches, and returns the texts plus statistics:
achieved sparsity per block (prefill and decode separately) and the FLOPs saved in the
decoder layers' linear maps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass
class FTPGenerateResult:
    """texts: generated continuations; sequences: (B, S) ids incl. the prompt; stats: dict."""

    texts: list
    sequences: torch.Tensor
    stats: dict = field(default_factory=dict)


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


def resolve_router(router, schedule):
    """``(router, schedule)``: a router object from a name or a saved file, and its schedule.

    A router file's stored schedules (keyed by the target sparsity, ``"0.30"``) are used when
    ``schedule`` is None or a float matching a stored key.
    """
    from tokenprune.ftp import RandomRouter, StaticRouter, TokenRouter

    if isinstance(router, str) and router in ("static", "random"):
        r = StaticRouter() if router == "static" else RandomRouter(0)
    elif isinstance(router, (str, Path)):
        r = TokenRouter.load(router)
        if schedule is None or isinstance(schedule, (int, float)):
            extra = TokenRouter.load_extra(router).get("schedules", {})
            key = None if schedule is None else f"{float(schedule):.2f}"
            if key in extra:
                schedule = extra[key]
            elif schedule is None and extra:
                schedule = next(iter(extra.values()))
    else:
        r = router
    if schedule is None:
        raise ValueError("give keep= (fraction of tokens each block computes) or schedule= (sparsity)")
    return r, schedule


def ftp_generate(
    model_or_path,
    prompts,
    *,
    router="static",
    schedule=None,
    keep=None,
    tokenizer=None,
    gguf_file: str | None = None,
    max_new_tokens: int = 32,
    chat: bool = False,
    do_sample: bool = False,
    allow_full: bool = False,
    nested: bool = False,
    **generate_kwargs,
) -> FTPGenerateResult:
    """Load a causal LM, attach FTP, generate, and report routing statistics.

    Args:
        model_or_path: a loaded ``*ForCausalLM`` or a local path / name for transformers.
        prompts: a string or a list of strings (batched with left padding).
        router: ``"static"``, ``"random"``, a :class:`~tokenprune.ftp.TokenRouter`, or the path of
            a router ``.safetensors`` file (its stored schedules are used when ``schedule`` is
            None or a float matching a stored target).
        schedule: sparsity, the documented alias of ``keep`` (``keep = 1 - sparsity``): a float
            (uniform) or one sparsity per decoder layer.
        keep: fraction of tokens each block computes (float or one per decoder layer); give
            ``keep`` or ``schedule``, not both.
        chat: wrap each prompt with the tokenizer's chat template.
        allow_full, nested: as in :func:`tokenprune.ftp.attach_ftp` (``nested=True``: no re-entry
            of skipped tokens; recommended for learned routers, see ``docs/ftp.md``).
    Returns:
        :class:`FTPGenerateResult`; ``stats`` is the handle's
        :class:`~tokenprune.stats.TokenStats` (``tokens_in``/``tokens_kept``: token-block pairs
        routed / computed, prefill and decode; ``forward_passes``: model forward calls), read
        once after ``generate``, with ``extras["prefill"]``, ``extras["decode"]`` (per-block
        sparsity, tokens, FLOPs saved), ``extras["schedule"]`` and ``extras["keep"]``. Decode
        counts stop at a row's end-of-sequence token (a finished row of a batch keeps being fed
        padding by ``generate``; those steps are not counted). With beam search every beam's
        tokens count (the compute spent).
    """
    from tokenprune.ftp import attach_ftp
    from tokenprune.ftp.schedule import sparsity_schedule

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
    r, schedule = resolve_router(router, sparsity_schedule(keep, schedule, allow_full=allow_full, required=False))
    handle = attach_ftp(model, r, schedule, allow_full=allow_full, nested=nested)
    stop = generate_kwargs.get("eos_token_id", getattr(getattr(model, "generation_config", None), "eos_token_id", None))
    try:
        handle.set_stop_tokens(stop if stop is not None else tok.eos_token_id)
        with torch.no_grad():
            seq = model.generate(
                **enc.to(model.device),
                max_new_tokens=max_new_tokens,
                do_sample=do_sample,
                pad_token_id=tok.pad_token_id,
                **generate_kwargs,
            )
        stats = handle.stats()
    finally:
        handle.detach()
    stats.extras["schedule"] = stats.extras.pop("target_per_block")
    stats.extras["keep"] = stats.extras.pop("keep_per_block")
    T0 = enc["input_ids"].shape[1]
    texts = tok.batch_decode(seq[:, T0:], skip_special_tokens=True)
    return FTPGenerateResult(texts=texts, sequences=seq, stats=stats)
