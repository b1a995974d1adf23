"""FTP training losses (pure tensor functions).

(paper) three losses: a guide loss toward the static router's decisions whose weight decays
over training, a one-sided sparsity loss ``sum_i max(target_i - achieved_i, 0)`` and a
distillation loss on the final hidden states vs. the dense model. The exact forms below
(BCE for the guide, soft achieved sparsity ``1 - mean(p)``, variance-normalised MSE or KL on
logits for distillation, the decay curve) are a reconstruction and are parameters.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _stack(xs, name):
    if isinstance(xs, torch.Tensor):
        return xs
    xs = [x for x in xs if x is not None]
    if not xs:
        raise ValueError(f"{name}: no routed layer produced a value")
    return torch.stack(xs)


def guide_loss(probs, static_keep, valid=None) -> torch.Tensor:
    """Binary cross-entropy between router keep probabilities and static-router decisions.

    Args:
        probs: (L, B, T) float in (0, 1) (or a list of (B, T)).
        static_keep: (L, B, T) bool/float static decisions, same shape.
        valid: optional (L, B, T) or (B, T) bool; padding excluded.
    Returns:
        scalar mean over valid entries.
    """
    p, y = _stack(probs, "probs"), _stack(static_keep, "static_keep").to(torch.float32)
    if p.shape != y.shape:
        raise ValueError(f"probs {tuple(p.shape)} and static_keep {tuple(y.shape)} differ")
    bce = F.binary_cross_entropy(p.float().clamp(1e-6, 1 - 1e-6), y, reduction="none")
    if valid is None:
        return bce.mean()
    v = _stack(valid, "valid").to(torch.float32).expand_as(bce)
    return (bce * v).sum() / v.sum().clamp_min(1.0)


def achieved_sparsity(probs, valid=None) -> torch.Tensor:
    """Soft achieved sparsity per layer ``1 - mean(p)`` over valid tokens: (L, B, T) -> (L,)."""
    p = _stack(probs, "probs").float()
    if valid is None:
        return 1.0 - p.mean(dim=(1, 2))
    v = _stack(valid, "valid").to(torch.float32).expand_as(p)
    return 1.0 - (p * v).sum(dim=(1, 2)) / v.sum(dim=(1, 2)).clamp_min(1.0)


def sparsity_loss(probs, targets, valid=None) -> torch.Tensor:
    """One-sided sparsity loss ``sum_i max(target_i - achieved_i, 0)`` (paper).

    Args:
        probs: (L, B, T) keep probabilities of the routed layers.
        targets: (L,) target sparsities of the same layers.
    Returns:
        scalar.
    """
    ach = achieved_sparsity(probs, valid)
    t = torch.as_tensor(targets, dtype=ach.dtype, device=ach.device)
    if t.shape != ach.shape:
        raise ValueError(f"targets {tuple(t.shape)} must match the {ach.shape[0]} routed layers")
    return torch.clamp(t - ach, min=0.0).sum()


def distill_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    *,
    kind: str = "hidden",
    temperature: float = 1.0,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Distillation of the routed model toward the dense one.

    Args:
        student, teacher: (B, T, H) final hidden states (``kind="hidden"``) or (B, T, V) logits
            (``kind="logits"``).
        kind: ``"hidden"``: MSE divided by the teacher's mean squared norm per feature (scale
            free); ``"logits"``: KL(teacher || student) at ``temperature`` (times T^2).
        valid: optional (B, T) bool to exclude padding.
    Returns:
        scalar.
    """
    if student.shape != teacher.shape:
        raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} differ")
    teacher = teacher.detach()
    w = None if valid is None else valid.to(torch.float32)
    if kind == "hidden":
        per = ((student.float() - teacher.float()) ** 2).mean(-1) / teacher.float().pow(2).mean().clamp_min(1e-12)
    elif kind == "logits":
        tau = float(temperature)
        ls = F.log_softmax(student.float() / tau, -1)
        lt = F.log_softmax(teacher.float() / tau, -1)
        per = (lt.exp() * (lt - ls)).sum(-1) * tau * tau
    else:
        raise ValueError(f"kind must be 'hidden' or 'logits', got {kind!r}")
    if w is None:
        return per.mean()
    return (per * w).sum() / w.sum().clamp_min(1.0)


def guide_weight(step: int, total: int, *, start: float = 1.0, end: float = 0.0, curve: str = "cosine") -> float:
    """Decaying guide-loss weight from ``start`` (step 0) to ``end`` (last step).

    curve: ``"cosine"``, ``"linear"`` or ``"exp"`` (geometric, ``end`` must be > 0).
    """
    if total <= 1:
        return float(end)
    f = min(max(step / (total - 1), 0.0), 1.0)
    if curve == "cosine":
        return float(end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * f)))
    if curve == "linear":
        return float(start + (end - start) * f)
    if curve == "exp":
        if start <= 0 or end <= 0:
            raise ValueError("exp decay needs start > 0 and end > 0")
        return float(start * (end / start) ** f)
    raise ValueError(f"curve must be 'cosine', 'linear' or 'exp', got {curve!r}")
