"""LocalLeap and the diffusion-LLM (dLLM) parallel-decoding family.

A masked diffusion LM (LLaDA, Dream, ...) fills a canvas of ``gen_length`` mask tokens after
the prompt. At every forward pass, for each still-masked position of the current block, the
model proposes ``x0 = argmax(logits)`` with confidence ``c = softmax(logits)[x0]``; a *commit
rule* decides which of these proposals become final. This module holds

* the one-step commit rules, pure functions over ``(B, L)`` tensors that return a ``(B, L)``
  bool mask of positions to commit (always a subset of ``masked``):

  - :func:`llada_topk` -- LLaDA low-confidence remasking: a fixed number per step
    (:func:`llada_schedule` gives the linear schedule);
  - :func:`fastdllm_threshold` -- Fast-dLLM: top-1 plus every ``c >= threshold``;
  - :func:`localleap_transfer` -- LocalLeap (arXiv 2510.07081): anchors (``c >= threshold``)
    relax the threshold to ``relaxed_threshold`` within ``radius`` positions;
  - :func:`eb_sampler` -- EB-sampler: the largest confidence-sorted prefix whose entropy sum
    minus its max entropy stays ``<= gamma``;

* one semi-autoregressive generate loop, :func:`localleap_generate`, that takes any rule and
  any model whose ``forward(input_ids, attention_mask=...)`` returns ``.logits`` over the
  canvas, and counts forward passes (NFE).

Tie-breaking is deterministic everywhere: among equal confidences the lower position wins.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

__all__ = [
    "llada_schedule",
    "llada_topk",
    "fastdllm_threshold",
    "localleap_transfer",
    "eb_sampler",
    "confidence_from_logits",
    "DecodeResult",
    "localleap_generate",
    "RULES",
]


# --------------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------------
def _check_pair(conf: torch.Tensor, masked: torch.Tensor) -> None:
    if not isinstance(conf, torch.Tensor) or not isinstance(masked, torch.Tensor):
        raise TypeError("conf and masked must be torch tensors")
    if conf.dim() != 2:
        raise ValueError(f"conf must have shape (B, L), got {tuple(conf.shape)}")
    if masked.shape != conf.shape:
        raise ValueError(f"masked must have the shape of conf {tuple(conf.shape)}, got {tuple(masked.shape)}")
    if masked.dtype != torch.bool:
        raise TypeError(f"masked must be a bool tensor, got {masked.dtype}")
    if not conf.is_floating_point():
        raise TypeError(f"conf must be a floating tensor, got {conf.dtype}")
    if torch.isnan(conf[masked]).any():
        raise ValueError("conf has NaN at masked positions")


def _check_threshold(name: str, value: float) -> None:
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


def _masked_conf(conf: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    return conf.masked_fill(~masked, float("-inf"))


def _top1(conf: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """(B, L) bool: the most confident masked position per row (lowest index on ties)."""
    idx = _masked_conf(conf, masked).argmax(dim=-1, keepdim=True)  # first maximum on ties
    top = torch.zeros_like(masked).scatter_(-1, idx, True)
    return top & masked.any(dim=-1, keepdim=True)


# --------------------------------------------------------------------------------------------
# commit rules
# --------------------------------------------------------------------------------------------
def llada_schedule(n_masked: torch.Tensor | int, steps: int) -> torch.Tensor:
    """LLaDA's linear schedule: tokens to commit at each of ``steps`` steps.

    Args:
        n_masked: ``(B,)`` int tensor (or an int) -- masked tokens in the block at its start.
        steps: steps for the block (>= 1).
    Returns:
        ``(B, steps)`` int64: ``n // steps`` everywhere plus one for the first ``n % steps``
        steps, so each row sums to ``n_masked``.
    """
    if int(steps) < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    n = torch.as_tensor(n_masked, dtype=torch.long).reshape(-1)
    if (n < 0).any():
        raise ValueError("n_masked must be >= 0")
    base = (n // steps).unsqueeze(1).expand(-1, steps)
    rem = (n % steps).unsqueeze(1)
    return base + (torch.arange(steps, device=n.device).unsqueeze(0) < rem).long()


def llada_topk(conf: torch.Tensor, masked: torch.Tensor, k: torch.Tensor | int) -> torch.Tensor:
    """LLaDA low-confidence rule: commit the ``k`` most confident masked positions per row.

    Args:
        conf: ``(B, L)`` float confidences.
        masked: ``(B, L)`` bool, still-masked positions of the current block.
        k: int or ``(B,)`` int tensor; clipped to the number of masked positions.
    Returns:
        ``(B, L)`` bool commit mask (``<= k`` per row, subset of ``masked``). Ties: lower index
        first.
    """
    _check_pair(conf, masked)
    B, L = conf.shape
    k = torch.as_tensor(k, dtype=torch.long, device=conf.device).reshape(-1)
    if k.numel() == 1:
        k = k.expand(B)
    if k.shape != (B,):
        raise ValueError(f"k must be an int or a (B,)={B} tensor, got shape {tuple(k.shape)}")
    if (k < 0).any():
        raise ValueError("k must be >= 0")
    order = torch.sort(_masked_conf(conf, masked), dim=-1, descending=True, stable=True).indices
    rank_ok = torch.arange(L, device=conf.device).unsqueeze(0) < k.unsqueeze(1)
    out = torch.zeros_like(masked).scatter_(-1, order, rank_ok)
    return out & masked


def fastdllm_threshold(conf: torch.Tensor, masked: torch.Tensor, *, threshold: float = 0.9) -> torch.Tensor:
    """Fast-dLLM confidence-threshold rule.

    Commit every masked position with ``conf >= threshold`` plus the most confident masked
    position of each row (so every pass makes progress).

    Args:
        conf: ``(B, L)`` float; masked: ``(B, L)`` bool.
    Returns:
        ``(B, L)`` bool commit mask.
    """
    _check_pair(conf, masked)
    _check_threshold("threshold", threshold)
    return (masked & (conf >= threshold)) | _top1(conf, masked)


def localleap_transfer(
    conf: torch.Tensor,
    masked: torch.Tensor,
    *,
    threshold: float = 0.9,
    relaxed_threshold: float = 0.75,
    radius: int = 4,
) -> torch.Tensor:
    """LocalLeap one-step commit rule (arXiv 2510.07081).

    Anchors are masked positions with ``conf >= threshold``. A masked position within
    ``radius`` positions of an anchor (``|i - a| <= radius``, the anchor included) is committed
    if ``conf >= relaxed_threshold``; any other masked position needs ``conf >= threshold``.
    The most confident masked position is always committed. Already-decoded positions
    (``masked == False``) are never anchors. With no anchor this equals
    :func:`fastdllm_threshold`.

    The window is a vectorised dilation of the anchor mask (``max_pool1d``).

    Args:
        conf: ``(B, L)`` float confidences (positions are consecutive canvas positions).
        masked: ``(B, L)`` bool, still-masked positions of the current block.
        threshold: anchor / global threshold.
        relaxed_threshold: threshold near anchors (``<= threshold``).
        radius: half-width of the window in positions (``>= 0``).
    Returns:
        ``(B, L)`` bool commit mask.
    """
    _check_pair(conf, masked)
    _check_threshold("threshold", threshold)
    _check_threshold("relaxed_threshold", relaxed_threshold)
    if relaxed_threshold > threshold:
        raise ValueError(f"relaxed_threshold ({relaxed_threshold}) must be <= threshold ({threshold})")
    if int(radius) != radius or radius < 0:
        raise ValueError(f"radius must be a non-negative int, got {radius}")
    anchors = masked & (conf >= threshold)
    r = min(int(radius), conf.shape[-1])
    near = (
        F.max_pool1d(anchors.to(torch.float32).unsqueeze(1), kernel_size=2 * r + 1, stride=1, padding=r).squeeze(1) > 0
    )
    commit = anchors | (near & masked & (conf >= relaxed_threshold))
    return commit | _top1(conf, masked)


def eb_sampler(conf: torch.Tensor, masked: torch.Tensor, entropy: torch.Tensor, *, gamma: float = 1e-3) -> torch.Tensor:
    """EB-sampler (entropy-bounded unmasking).

    Sort the masked positions by confidence (descending, lower index first on ties) and
    commit the largest prefix ``U`` with ``sum_{i in U} H_i - max_{i in U} H_i <= gamma``;
    at least one position per row with any masked position.

    Args:
        conf: ``(B, L)`` float confidences (the sort key).
        masked: ``(B, L)`` bool.
        entropy: ``(B, L)`` float, entropy ``H(p_i)`` (nats) of each position's distribution.
        gamma: entropy budget (>= 0).
    Returns:
        ``(B, L)`` bool commit mask.
    """
    _check_pair(conf, masked)
    if not isinstance(entropy, torch.Tensor) or entropy.shape != conf.shape:
        raise ValueError(f"entropy must be a tensor of shape {tuple(conf.shape)}")
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    order = torch.sort(_masked_conf(conf, masked), dim=-1, descending=True, stable=True).indices
    h = entropy.to(torch.float64).clamp_min(0).masked_fill(~masked, 0.0).gather(-1, order)
    # sum - max is non-decreasing along the prefix, so the prefix is where it is <= gamma
    ok = (h.cumsum(-1) - h.cummax(-1).values) <= gamma
    ok[:, 0] = True
    out = torch.zeros_like(masked).scatter_(-1, order, ok)
    return out & masked


# --------------------------------------------------------------------------------------------
# generate loop
# --------------------------------------------------------------------------------------------
RULES = ("llada", "fastdllm", "localleap", "eb")


def confidence_from_logits(
    logits: torch.Tensor,
    *,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
    need_entropy: bool = False,
    exclude_id: int | None = None,
):
    """Proposals and confidences from logits.

    Args:
        logits: ``(B, L, V)``.
        temperature: 0 -> ``x0 = argmax(logits)``; > 0 -> Gumbel-max sampling at that
            temperature, computed in float64 (LLaDA convention).
        exclude_id: a token that may never be proposed (the mask id: committing it would
            leave the position masked forever); its logit is set to -inf first.
    Returns:
        ``(x0, conf, entropy)``: ``(B, L)`` int64, ``(B, L)`` float32 ``softmax(logits)[x0]``,
        and ``(B, L)`` float32 entropy of ``softmax(logits)`` (or None).
    """
    if exclude_id is not None and 0 <= exclude_id < logits.shape[-1]:
        logits = logits.clone()
        logits[..., exclude_id] = float("-inf")
    logp = torch.log_softmax(logits.float(), dim=-1)
    if temperature > 0:
        u = torch.rand(logits.shape, dtype=torch.float64, device=logits.device, generator=generator)
        gumbel = -torch.log(-torch.log(u.clamp_min(1e-300)))
        x0 = (logits.to(torch.float64) / temperature + gumbel).argmax(-1)
    else:
        x0 = logp.argmax(-1)
    conf = logp.gather(-1, x0.unsqueeze(-1)).squeeze(-1).exp()
    entropy = -(logp.exp() * logp).nan_to_num(0.0).sum(-1) if need_entropy else None
    return x0, conf, entropy


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
    """

    ids: torch.Tensor
    nfe: int
    row_nfe: torch.Tensor
    block_nfe: list = field(default_factory=list)
    committed: torch.Tensor | None = None
    tokens_per_forward: float = 0.0
    prompt_length: int = 0

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
        _check_threshold("threshold", threshold)
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
    return DecodeResult(
        ids=x,
        nfe=nfe,
        row_nfe=row_nfe,
        block_nfe=block_nfe,
        committed=committed,
        tokens_per_forward=tpf,
        prompt_length=P,
    )
