"""The semi-autoregressive generate loop of masked diffusion LMs with a pluggable commit rule.

A masked diffusion LM (LLaDA, Dream, ...) fills a canvas of ``gen_length`` mask tokens after
the prompt, block by block. At every forward pass, for each still-masked position of the
current block, the model proposes ``x0 = argmax(logits)`` with confidence
``c = softmax(logits)[x0]``; a commit rule of :mod:`.rules` decides which proposals become
final. :func:`localleap_generate` runs any rule on any model whose ``forward(input_ids,
attention_mask=...)`` returns ``.logits`` over the canvas and counts forward passes (NFE).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from tokenprune.stats import TokenStats

from .rules import (
    check_threshold,
    confidence_from_logits,
    eb_sampler,
    fastdllm_threshold,
    llada_schedule,
    llada_topk,
    localleap_transfer,
)

__all__ = ["DecodeResult", "localleap_generate", "RULES"]

RULES = ("llada", "fastdllm", "localleap", "eb")


@dataclass
class DecodeResult:
    """Output of :func:`localleap_generate`.

    Unpacks as ``ids, nfe = result`` (the DESIGN contract).

    Attributes:
        ids: ``(B, P + gen_length)`` int64 canvas: (left-padded) prompt + generated tokens.
        nfe: forward passes of the model (a batched pass counts once).
        row_nfe: ``(B,)`` passes during which each row still had masked tokens in its block.
        block_nfe: passes per block (list of ``gen_length / block_length`` ints).
        committed: ``(B,)`` tokens committed by the rule per row (excludes EOS fill).
        tokens_per_forward: ``committed.sum() / row_nfe.sum()``.
        prompt_length: ``P``, where the generated part starts.
        stats: :class:`~tokenprune.stats.TokenStats` with ``method="localleap"``,
            ``tokens_in`` = positions generated (``B * gen_length``), ``tokens_kept`` = tokens
            committed by the rule, ``forward_passes`` = NFE; ``extras``: ``row_nfe`` (sum over
            rows), ``tokens_per_forward``, ``rule``.
    """

    ids: torch.Tensor
    nfe: int
    row_nfe: torch.Tensor
    block_nfe: list = field(default_factory=list)
    committed: torch.Tensor | None = None
    tokens_per_forward: float = 0.0
    prompt_length: int = 0
    stats: TokenStats | None = None

    def __iter__(self):
        return iter((self.ids, self.nfe))

    @property
    def generated(self) -> torch.Tensor:
        """``(B, gen_length)`` generated tokens."""
        return self.ids[:, self.prompt_length :]


def _left_pad(input_ids, attention_mask, pad_id):
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (B, P), got {tuple(input_ids.shape)}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError("attention_mask must have the shape of input_ids")
        return input_ids.long(), attention_mask
    seqs = [torch.as_tensor(s, dtype=torch.long).reshape(-1) for s in input_ids]
    if not seqs:
        raise ValueError("input_ids is empty")
    P = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), P), int(pad_id), dtype=torch.long)
    am = torch.zeros((len(seqs), P), dtype=torch.long)
    for i, s in enumerate(seqs):  # once per prompt, not per token
        if len(s):
            ids[i, P - len(s) :] = s
            am[i, P - len(s) :] = 1
    if attention_mask is not None:
        raise ValueError("attention_mask is built from the list of prompts; do not pass one")
    return ids, am


def _trim_cache(cache, n: int):
    """Keep the first ``n`` positions of a KV cache (tuple of (k, v) or an object with crop)."""
    if hasattr(cache, "crop"):
        cache.crop(n)
        return cache
    if isinstance(cache, (tuple, list)):
        return tuple(tuple(t[..., :n, :] for t in layer) for layer in cache)
    raise TypeError(f"unsupported past_key_values type {type(cache).__name__}")


def localleap_generate(
    model: Callable,
    input_ids,
    *,
    gen_length: int = 256,
    block_length: int = 32,
    mask_id: int,
    rule: str | Callable = "localleap",
    threshold: float = 0.9,
    relaxed_threshold: float = 0.75,
    radius: int = 4,
    gamma: float = 1e-3,
    steps: int | None = None,
    temperature: float = 0.0,
    eos_id: int | None = None,
    early_stop: bool = False,
    attention_mask: torch.Tensor | None = None,
    pad_id: int | None = None,
    use_cache: bool = False,
    shift_logits: bool = False,
    generator: torch.Generator | None = None,
) -> DecodeResult:
    """Semi-autoregressive masked-diffusion decoding with a pluggable commit rule.

    The canvas is ``prompt + [mask_id] * gen_length``; it is filled block by block
    (``block_length`` tokens), left to right; tokens after the current block are never
    committed. Each iteration runs one forward pass of ``model`` over the canvas, takes
    ``x0``/confidence at the current block's masked positions and commits what ``rule``
    selects.

    Args:
        model: callable ``model(input_ids=(B,T), attention_mask=(B,T) or None) -> obj`` with
            ``obj.logits`` of shape ``(B, T, V)`` (bidirectional, LLaDA/Dream-style).
        input_ids: ``(B, P)`` int tensor (left-padded when ``attention_mask`` has zeros), or a
            list of 1-D prompts that are left-padded here with ``pad_id``.
        gen_length: tokens to generate; must be a multiple of ``block_length``.
        mask_id: the model's mask token id (from its tokenizer/config; never guessed here).
        rule: ``"localleap"`` (default), ``"fastdllm"``, ``"llada"``, ``"eb"`` or a callable
            ``rule(conf, masked) -> (B, L) bool`` over the current block.
        threshold, relaxed_threshold, radius: LocalLeap / Fast-dLLM parameters.
        gamma: EB-sampler entropy budget.
        steps: LLaDA only; total steps over ``gen_length`` (default ``gen_length``: one token
            per step), split evenly over blocks. Steps in which no row commits are skipped.
        temperature: 0 = greedy; > 0 adds Gumbel noise in float64.
        eos_id: end-of-sequence id. With ``early_stop=True``, once a finished block of a row
            contains ``eos_id``, the rest of that row is filled with ``eos_id`` without
            further passes, and decoding stops when every row is done.
        attention_mask: ``(B, P)`` 1/0 for left-padded tensor prompts; extended with ones
            over the generated part and passed to the model. When None (and prompts are a
            tensor) no mask is passed.
        pad_id: padding id for list prompts (default ``eos_id`` if given, else ``mask_id``).
        use_cache: prefix KV caching (Fast-dLLM's "prefix cache", an approximation for
            bidirectional models): at each block start one full pass with ``use_cache=True``;
            the cache of the positions before the block is kept and the block's later passes
            feed only ``canvas[:, block_start:]`` with ``past_key_values``. The model must
            accept ``use_cache``/``past_key_values`` and return ``.past_key_values`` (a tuple
            of per-layer ``(k, v)`` with positions on dim -2, or an object with ``crop``).
        shift_logits: the model predicts position ``i`` from the logits at ``i - 1`` (Dream,
            which is initialised from an autoregressive LM); logits are shifted right by one
            before use. Not combinable with ``use_cache``.
        generator: torch generator for the Gumbel noise.
    Returns:
        :class:`DecodeResult` (unpacks as ``ids, nfe``).
    """
    if gen_length <= 0 or block_length <= 0:
        raise ValueError("gen_length and block_length must be positive")
    if gen_length % block_length:
        raise ValueError(f"gen_length ({gen_length}) must be a multiple of block_length ({block_length})")
    if mask_id is None:
        raise ValueError("mask_id is required (take it from the tokenizer or config)")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if isinstance(rule, str) and rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; expected one of {RULES} or a callable")
    if not isinstance(rule, str) and not callable(rule):
        raise TypeError("rule must be a rule name or a callable(conf, masked) -> bool mask")
    if rule == "localleap":
        check_threshold("threshold", threshold)
        if relaxed_threshold > threshold:
            raise ValueError("relaxed_threshold must be <= threshold")
    if early_stop and eos_id is None:
        raise ValueError("early_stop=True needs eos_id")
    if shift_logits and use_cache:
        raise ValueError("shift_logits (Dream) is not supported together with use_cache")

    prompt, am = _left_pad(
        input_ids, attention_mask, pad_id if pad_id is not None else (eos_id if eos_id is not None else mask_id)
    )
    device = prompt.device
    try:  # follow the model's device when it has parameters
        device = next(model.parameters()).device
    except (AttributeError, StopIteration, TypeError):
        pass
    prompt = prompt.to(device)
    B, P = prompt.shape
    x = torch.cat([prompt, torch.full((B, gen_length), int(mask_id), dtype=torch.long, device=device)], dim=1)
    full_am = None
    if am is not None:
        am = am.to(device)
        full_am = torch.cat([am.long(), torch.ones((B, gen_length), dtype=torch.long, device=device)], dim=1)
    num_blocks = gen_length // block_length
    if rule == "llada":
        total_steps = gen_length if steps is None else int(steps)
        if total_steps < num_blocks or total_steps % num_blocks:
            raise ValueError(
                f"steps ({total_steps}) must be a positive multiple of the number of blocks ({num_blocks})"
            )
        steps_per_block = total_steps // num_blocks
    need_entropy = rule == "eb"

    nfe = 0
    row_nfe = torch.zeros(B, dtype=torch.long, device=device)
    committed = torch.zeros(B, dtype=torch.long, device=device)
    block_nfe: list[int] = []
    done = torch.zeros(B, dtype=torch.bool, device=device)

    def forward(inp, cache=None, want_cache=False):
        kwargs = {}
        if full_am is not None:
            kwargs["attention_mask"] = full_am
        if cache is not None:
            kwargs["past_key_values"] = cache
        if want_cache or cache is not None:
            kwargs["use_cache"] = want_cache
        out = model(input_ids=inp, **kwargs)
        logits = out.logits if hasattr(out, "logits") else out
        if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
            raise TypeError("model output must have .logits of shape (B, T, V)")
        if logits.shape[:2] != inp.shape:
            raise ValueError(
                f"model returned logits of shape {tuple(logits.shape)} for input "
                f"{tuple(inp.shape)}; it must score every canvas position"
            )
        if shift_logits:
            logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        return logits, getattr(out, "past_key_values", None)

    with torch.no_grad():
        for b in range(num_blocks):
            s, e = P + b * block_length, P + (b + 1) * block_length
            if early_stop and done.all():
                block_nfe.append(0)
                continue
            block_passes = 0
            cache = None
            if rule == "llada":
                schedule = llada_schedule((x[:, s:e] == mask_id).sum(-1), steps_per_block)
                schedule = schedule.to(device)
            step = 0
            while True:
                masked = x[:, s:e] == mask_id
                if not masked.any():
                    break
                if rule == "llada":
                    while step < steps_per_block and not schedule[:, step].any():
                        step += 1
                    if step >= steps_per_block:  # schedule exhausted (cannot happen: sums)
                        break
                if use_cache and cache is not None:
                    logits, _ = forward(x[:, s:], cache=cache)
                    block_logits = logits[:, : e - s]
                    cache = _trim_cache(cache, s)
                else:
                    logits, new_cache = forward(x, want_cache=use_cache)
                    block_logits = logits[:, s:e]
                    if use_cache:
                        if new_cache is None:
                            raise TypeError("use_cache=True but the model returned no past_key_values")
                        cache = _trim_cache(new_cache, s)
                nfe += 1
                block_passes += 1
                row_nfe += masked.any(-1).long()
                x0, conf, ent = confidence_from_logits(
                    block_logits,
                    temperature=temperature,
                    generator=generator,
                    need_entropy=need_entropy,
                    exclude_id=int(mask_id),
                )
                if rule == "localleap":
                    commit = localleap_transfer(
                        conf, masked, threshold=threshold, relaxed_threshold=relaxed_threshold, radius=radius
                    )
                elif rule == "fastdllm":
                    commit = fastdllm_threshold(conf, masked, threshold=threshold)
                elif rule == "eb":
                    commit = eb_sampler(conf, masked, ent, gamma=gamma)
                elif rule == "llada":
                    commit = llada_topk(conf, masked, schedule[:, step])
                    step += 1
                else:
                    commit = rule(conf, masked)
                    if (
                        not isinstance(commit, torch.Tensor)
                        or commit.dtype != torch.bool
                        or commit.shape != masked.shape
                    ):
                        raise TypeError("a custom rule must return a (B, L) bool tensor")
                    commit = commit & masked
                    stuck = masked.any(-1) & ~commit.any(-1)
                    if stuck.any():
                        raise RuntimeError(
                            "custom rule committed nothing for a row with masked tokens; it would never finish"
                        )
                x[:, s:e] = torch.where(commit, x0, x[:, s:e])
                committed += commit.sum(-1)
            block_nfe.append(block_passes)
            if early_stop:
                done |= (x[:, P:e] == eos_id).any(-1)
                if done.any() and e < x.shape[1]:
                    tail = x[:, e:]
                    x[:, e:] = torch.where(done.unsqueeze(1), torch.full_like(tail, eos_id), tail)
    total_rows = int(row_nfe.sum())
    tpf = float(committed.sum()) / total_rows if total_rows else 0.0
    stats = TokenStats(
        method="localleap",
        tokens_in=B * gen_length,
        tokens_kept=int(committed.sum()),
        forward_passes=nfe,
        extras={
            "row_nfe": total_rows,
            "tokens_per_forward": tpf,
            "rule": rule if isinstance(rule, str) else getattr(rule, "__name__", "custom"),
        },
    )
    return DecodeResult(
        ids=x,
        stats=stats,
        nfe=nfe,
        row_nfe=row_nfe,
        block_nfe=block_nfe,
        committed=committed,
        tokens_per_forward=tpf,
        prompt_length=P,
    )
