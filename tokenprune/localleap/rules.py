"""The one-step commit rules of the dLLM parallel-decoding family (pure functions).

Each rule maps ``(B, L)`` tensors over the current block (``conf`` float confidences,
``masked`` bool still-masked positions) to a ``(B, L)`` bool mask of positions to commit,
always a subset of ``masked`` and non-empty for every row that still has a masked position:

- :func:`llada_topk` -- LLaDA low-confidence remasking: a fixed number per step
  (:func:`llada_schedule` / :func:`llada_step_counts` give the linear schedule);
- :func:`fastdllm_threshold` -- Fast-dLLM: top-1 plus every ``c >= threshold``;
- :func:`localleap_transfer` -- LocalLeap (arXiv 2510.07081): anchors (``c >= threshold``)
  relax the threshold to ``relaxed_threshold`` within ``radius`` positions;
- :func:`eb_sampler` -- EB-sampler: the largest confidence-sorted prefix whose entropy sum
  minus its max entropy stays ``<= gamma``.

:func:`confidence_from_logits` turns logits into proposals ``x0`` and confidences
(:func:`filter_logits`: top-p / top-k); :func:`commit_mask` dispatches a rule by name.
Tie-breaking is deterministic everywhere: among equal confidences the lower position wins
(the stable ranking of :mod:`prunecore.budget`).

Host reads: the rules are device-side except their value checks (NaN confidences, a negative
``k`` tensor, a custom rule that commits nothing), each one read of a value back to the host.
``check_values=False`` skips them for a caller that checks on the device itself
(:func:`~tokenprune.localleap.generate.localleap_generate` folds them into its one read per pass).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from prunecore.budget import torch_rank

RULES = ("llada", "fastdllm", "localleap", "eb")
REMASKING = ("low_confidence", "random")

__all__ = [
    "RULES",
    "REMASKING",
    "RuleOptions",
    "commit_mask",
    "llada_schedule",
    "llada_step_counts",
    "llada_topk",
    "fastdllm_threshold",
    "localleap_transfer",
    "eb_sampler",
    "confidence_from_logits",
    "filter_logits",
    "check_threshold",
]


# --------------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------------
def _check_pair(conf: torch.Tensor, masked: torch.Tensor, check_values: bool = True) -> None:
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
    if check_values and (conf.isnan() & masked).any():  # no boolean indexing: one host read, not two
        raise ValueError("conf has NaN at masked positions")


def check_threshold(name: str, value: float) -> None:
    """Raise a ValueError naming ``name`` unless ``value`` is in [0, 1]."""
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


@dataclass(frozen=True)
class RuleOptions:
    """The parameters of the commit rules, in one value (what ``localleap_generate`` takes as
    ``rule_options=`` or as keywords).

    Attributes:
        threshold, relaxed_threshold, radius: LocalLeap / Fast-dLLM (:func:`localleap_transfer`,
            :func:`fastdllm_threshold`).
        gamma: EB-sampler entropy budget (:func:`eb_sampler`).
        steps: LLaDA only; total steps over ``gen_length`` (None: one token per step).
        remasking: ``"low_confidence"`` or ``"random"`` (LLaDA's random remasking; ``rule="llada"`` only).
    """

    threshold: float = 0.9
    relaxed_threshold: float = 0.75
    radius: int = 4
    gamma: float = 1e-3
    steps: int | None = None
    remasking: str = "low_confidence"

    @classmethod
    def resolve(cls, options: RuleOptions | None = None, **keywords) -> RuleOptions:
        """``options`` (default: the defaults) with ``keywords`` replaced; an unknown keyword is a
        ``TypeError`` naming it and the rule options."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(keywords) - set(names))
        if unknown:
            raise TypeError(f"unknown option(s) {unknown}: the rule options are {names} (see RuleOptions)")
        return dataclasses.replace(options if options is not None else cls(), **keywords)

    def check(self, rule) -> None:
        """Raise a ValueError naming the first value ``rule`` (a name or a callable) cannot use."""
        if rule == "localleap":
            check_threshold("threshold", self.threshold)
            if self.relaxed_threshold > self.threshold:
                raise ValueError("relaxed_threshold must be <= threshold")
        if self.remasking not in REMASKING:
            raise ValueError(f"remasking must be one of {REMASKING}, got {self.remasking!r}")
        if self.remasking == "random" and rule != "llada":
            raise ValueError("remasking='random' is LLaDA's top-k remasking; use it with rule='llada'")


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


def llada_step_counts(n_masked: int, steps: int) -> list[int]:
    """One row of :func:`llada_schedule` as Python ints (no tensor, no host read): the tokens to
    commit at each of ``steps`` steps from ``n_masked >= 0`` masked tokens."""
    n, steps = int(n_masked), int(steps)
    if steps < 1 or n < 0:
        raise ValueError(f"steps must be >= 1 and n_masked >= 0, got steps={steps}, n_masked={n}")
    return [n // steps + (j < n % steps) for j in range(steps)]


def llada_topk(
    conf: torch.Tensor, masked: torch.Tensor, k: torch.Tensor | int, *, check_values: bool = True
) -> torch.Tensor:
    """LLaDA low-confidence rule: commit the ``k`` most confident masked positions per row.

    Args:
        conf: ``(B, L)`` float confidences.
        masked: ``(B, L)`` bool, still-masked positions of the current block.
        k: int or ``(B,)`` int tensor; clipped to the number of masked positions.
        check_values: check ``conf`` for NaN and a ``k`` tensor for negatives (host reads).
    Returns:
        ``(B, L)`` bool commit mask (``<= k`` per row, subset of ``masked``). Ties: lower index
        first.
    """
    _check_pair(conf, masked, check_values)
    B, L = conf.shape
    if not isinstance(k, torch.Tensor):  # a Python count: checked and compared without a tensor
        if int(k) < 0:
            raise ValueError("k must be >= 0")
        return (torch_rank(_masked_conf(conf, masked)) < int(k)) & masked
    k = k.to(dtype=torch.long, device=conf.device).reshape(-1)
    if k.numel() == 1:
        k = k.expand(B)
    if k.shape != (B,):
        raise ValueError(f"k must be an int or a (B,)={B} tensor, got shape {tuple(k.shape)}")
    if check_values and (k < 0).any():
        raise ValueError("k must be >= 0")
    return (torch_rank(_masked_conf(conf, masked)) < k.unsqueeze(1)) & masked


def fastdllm_threshold(
    conf: torch.Tensor, masked: torch.Tensor, *, threshold: float = 0.9, check_values: bool = True
) -> torch.Tensor:
    """Fast-dLLM confidence-threshold rule.

    Commit every masked position with ``conf >= threshold`` plus the most confident masked
    position of each row (so every pass makes progress).

    Args:
        conf: ``(B, L)`` float; masked: ``(B, L)`` bool.
        check_values: check ``conf`` for NaN at masked positions (one host read).
    Returns:
        ``(B, L)`` bool commit mask.
    """
    _check_pair(conf, masked, check_values)
    check_threshold("threshold", threshold)
    return (masked & (conf >= threshold)) | _top1(conf, masked)


def localleap_transfer(
    conf: torch.Tensor,
    masked: torch.Tensor,
    *,
    threshold: float = 0.9,
    relaxed_threshold: float = 0.75,
    radius: int = 4,
    check_values: bool = True,
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
        check_values: check ``conf`` for NaN at masked positions (one host read).
    Returns:
        ``(B, L)`` bool commit mask.
    """
    _check_pair(conf, masked, check_values)
    check_threshold("threshold", threshold)
    check_threshold("relaxed_threshold", relaxed_threshold)
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


def eb_sampler(
    conf: torch.Tensor, masked: torch.Tensor, entropy: torch.Tensor, *, gamma: float = 1e-3, check_values: bool = True
) -> torch.Tensor:
    """EB-sampler (entropy-bounded unmasking).

    Sort the masked positions by confidence (descending, lower index first on ties) and
    commit the largest prefix ``U`` with ``sum_{i in U} H_i - max_{i in U} H_i <= gamma``;
    at least one position per row with any masked position.

    Args:
        conf: ``(B, L)`` float confidences (the sort key).
        masked: ``(B, L)`` bool.
        entropy: ``(B, L)`` float, entropy ``H(p_i)`` (nats) of each position's distribution.
        gamma: entropy budget (>= 0).
        check_values: check ``conf`` for NaN at masked positions (one host read).
    Returns:
        ``(B, L)`` bool commit mask.
    """
    _check_pair(conf, masked, check_values)
    if not isinstance(entropy, torch.Tensor) or entropy.shape != conf.shape:
        raise ValueError(f"entropy must be a tensor of shape {tuple(conf.shape)}")
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    order = torch.argsort(_masked_conf(conf, masked), dim=-1, descending=True, stable=True)
    h = entropy.to(torch.float64).clamp_min(0).masked_fill(~masked, 0.0).gather(-1, order)
    # sum - max is non-decreasing along the prefix, so the prefix is where it is <= gamma
    ok = (h.cumsum(-1) - h.cummax(-1).values) <= gamma
    ok[:, 0] = True
    out = torch.zeros_like(masked).scatter_(-1, order, ok)
    return out & masked


def filter_logits(logits: torch.Tensor, *, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Nucleus then top-k filtering (Dream's order): dropped tokens get ``-inf``.

    Args:
        logits: ``(..., V)`` float.
        top_p: keep the smallest set of most likely tokens whose probability reaches ``top_p``
            (the token that crosses it included); None or 1 = off.
        top_k: keep the ``top_k`` largest logits (ties at the k-th value kept); None or 0 = off.
    Returns:
        ``(..., V)`` logits with the dropped entries at ``-inf``.
    """
    if top_p is not None and top_p < 1:
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True, stable=True)
        beyond = torch.softmax(sorted_logits, dim=-1).cumsum(-1) > top_p
        drop = torch.zeros_like(beyond)
        drop[..., 1:] = beyond[..., :-1]  # keep the token that crosses top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter_(-1, order, drop), float("-inf"))
    if top_k:
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {top_k}")
        kth = torch.topk(logits, min(int(top_k), logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return logits


def confidence_from_logits(
    logits: torch.Tensor,
    *,
    temperature: float = 0.0,
    top_p: float | None = None,
    top_k: int | None = None,
    scaled_confidence: bool = False,
    generator: torch.Generator | None = None,
    need_entropy: bool = False,
    exclude_id: int | None = None,
):
    """Proposals and confidences from logits.

    Args:
        logits: ``(B, L, V)``.
        temperature: 0 -> ``x0 = argmax``; > 0 -> Gumbel-max sampling at that temperature with
            the noise in float64 (LLaDA's convention; the same distribution as Dream's
            categorical sampling, a different random stream).
        top_p, top_k: :func:`filter_logits` before choosing ``x0`` (Dream's sampling options).
        scaled_confidence: the confidence is read from the temperature-scaled, filtered
            distribution (Dream: scale, filter, softmax); False: from the unscaled (filtered)
            distribution (LLaDA: ``softmax(logits)[x0]``).
        exclude_id: a token that may never be proposed (the mask id: committing it would
            leave the position masked forever); its logit is set to -inf first.
    Returns:
        ``(x0, conf, entropy)``: ``(B, L)`` int64, ``(B, L)`` float32 confidence of ``x0``,
        and ``(B, L)`` float32 entropy of the confidence distribution (or None).
    """
    z = logits.float()
    if exclude_id is not None and 0 <= exclude_id < z.shape[-1]:
        z = z.clone()
        z[..., exclude_id] = float("-inf")
    if temperature > 0 and scaled_confidence:
        z = z / temperature
    z = filter_logits(z, top_k=top_k, top_p=top_p)
    logp = torch.log_softmax(z, dim=-1)
    if temperature > 0:
        u = torch.rand(z.shape, dtype=torch.float64, device=z.device, generator=generator)
        gumbel = -torch.log(-torch.log(u.clamp_min(1e-300)))
        scale = 1.0 if scaled_confidence else temperature
        x0 = (z.to(torch.float64) / scale + gumbel).argmax(-1)
    else:
        x0 = logp.argmax(-1)
    conf = logp.gather(-1, x0.unsqueeze(-1)).squeeze(-1).exp()
    entropy = -(logp.exp() * logp).nan_to_num(0.0).sum(-1) if need_entropy else None
    return x0, conf, entropy


def commit_mask(
    rule, conf, masked, entropy, k, *, threshold, relaxed_threshold, radius, gamma, check_values: bool = True
):
    """The ``(B, L)`` commit mask of ``rule`` over the current block.

    Args:
        rule: a name of :data:`RULES` or a callable ``rule(conf, masked) -> (B, L) bool``.
        conf, masked: ``(B, L)`` confidences and still-masked positions.
        entropy: ``(B, L)`` entropies (``"eb"``), else unused.
        k: ``(B,)`` tensor or int, tokens to commit (``"llada"``), else unused.
        check_values: the value checks that read back to the host (NaN confidences, a custom
            rule committing nothing for a row with masked positions); False: the caller checks.
    """
    if rule == "localleap":
        return localleap_transfer(
            conf,
            masked,
            threshold=threshold,
            relaxed_threshold=relaxed_threshold,
            radius=radius,
            check_values=check_values,
        )
    if rule == "fastdllm":
        return fastdllm_threshold(conf, masked, threshold=threshold, check_values=check_values)
    if rule == "eb":
        return eb_sampler(conf, masked, entropy, gamma=gamma, check_values=check_values)
    if rule == "llada":
        return llada_topk(conf, masked, k, check_values=check_values)
    commit = rule(conf, masked)
    if not isinstance(commit, torch.Tensor) or commit.dtype != torch.bool or commit.shape != masked.shape:
        raise TypeError("a custom rule must return a (B, L) bool tensor")
    commit = commit & masked
    if check_values and (masked.any(-1) & ~commit.any(-1)).any():
        raise RuntimeError("custom rule committed nothing for a row with masked tokens; it would never finish")
    return commit
