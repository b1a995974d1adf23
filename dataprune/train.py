"""Small training helpers for pruning studies: train a classifier on a kept subset, with or
without soft targets from cached teacher logits (KD-aided random subsets, Ben-Baruch et al.).

Everything works on in-memory tensors: inputs x (n, ...) float, labels y (n,) int64, optional
teacher logits (n, C) (e.g. ``TeacherLogitCache.read(keys)``). The recipe is fixed and seeded
(AdamW + cosine decay), so subsets of different size are trained comparably: ``epochs`` passes,
but at least ``min_steps`` optimiser steps (small subsets would otherwise stop far from
convergence).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .kd import kd_loss


def _check_xy(x: torch.Tensor, y: torch.Tensor | None, name: str = "x") -> int:
    if not torch.is_tensor(x) or not x.is_floating_point():
        raise TypeError(
            f"{name} must be a floating-point tensor, got {type(x).__name__ if not torch.is_tensor(x) else x.dtype}"
        )
    n = x.shape[0]
    if y is not None:
        if not torch.is_tensor(y) or y.dtype not in (torch.int64, torch.int32):
            raise TypeError("labels must be an int64/int32 tensor")
        if y.shape != (n,):
            raise ValueError(f"labels shape {tuple(y.shape)} does not match ({n},)")
    return n


def train_classifier(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    batch_size: int = 128,
    lr: float = 2e-3,
    weight_decay: float = 5e-4,
    min_steps: int = 0,
    seed: int = 0,
    teacher_logits: torch.Tensor | None = None,
    alpha: float = 0.0,
    temperature: float = 4.0,
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
    device: str = "cpu",
) -> dict:
    """Train ``model`` in place on x (n, ...) / y (n,); return ``{"steps", "loss"}``.

    With ``teacher_logits`` (n, C) the loss is :func:`dataprune.kd_loss` with weight ``alpha``
    and ``temperature``; ``alpha=0`` (or no teacher) is plain cross-entropy. The number of
    steps is ``max(epochs * ceil(n / batch_size), min_steps)``; batches are drawn from seeded
    per-epoch permutations (the last partial batch of an epoch is kept). ``augment(xb, gen)``
    may transform each input batch. ``loss`` is the mean loss over the last 20 steps.
    """
    n = _check_xy(x, y)
    if n == 0:
        raise ValueError("cannot train on an empty subset (n = 0)")
    if epochs < 0 or min_steps < 0 or (epochs == 0 and min_steps == 0):
        raise ValueError(
            f"need epochs >= 0, min_steps >= 0 and at least one step, got epochs={epochs}, min_steps={min_steps}"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if alpha > 0 and teacher_logits is None:
        raise ValueError("alpha > 0 needs teacher_logits (n, C)")
    if teacher_logits is not None:
        if teacher_logits.ndim != 2 or teacher_logits.shape[0] != n:
            raise ValueError(f"teacher_logits shape {tuple(teacher_logits.shape)} must be ({n}, C)")
        if not torch.isfinite(teacher_logits).all():
            raise ValueError("teacher_logits contain NaN/inf")
        teacher_logits = teacher_logits.float()
    steps_per_epoch = math.ceil(n / batch_size)
    total = max(epochs * steps_per_epoch, min_steps)
    gen = torch.Generator().manual_seed(int(seed))
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1.0 + math.cos(math.pi * min(s, total) / total)))
    losses = []
    step = 0
    while step < total:
        perm = torch.randperm(n, generator=gen)
        for start in range(0, n, batch_size):
            if step >= total:
                break
            idx = perm[start : start + batch_size]
            xb = x[idx]
            if augment is not None:
                xb = augment(xb, gen)
            xb, yb = xb.to(device), y[idx].to(device)
            logits = model(xb)
            if teacher_logits is not None and alpha > 0:
                loss = kd_loss(logits, teacher_logits[idx].to(device), yb, alpha=alpha, temperature=temperature)
            else:
                loss = F.cross_entropy(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            step += 1
    model.eval()
    return {"steps": total, "loss": float(np.mean(losses[-20:]))}


@torch.inference_mode()
def predict_logits(
    model: torch.nn.Module, x: torch.Tensor, *, batch_size: int = 1024, device: str = "cpu"
) -> torch.Tensor:
    """Logits (n, C) float32 of ``model`` (put in eval mode) on x (n, ...), batched."""
    _check_xy(x, None)
    model.to(device).eval()
    outs = [model(x[s : s + batch_size].to(device)).float().cpu() for s in range(0, x.shape[0], batch_size)]
    return torch.cat(outs) if outs else torch.empty(0)


def accuracy(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 1024, device: str = "cpu"
) -> float:
    """Top-1 accuracy in [0, 1] of ``model`` on x (n, ...) / y (n,)."""
    n = _check_xy(x, y)
    if n == 0:
        raise ValueError("accuracy of an empty set is undefined")
    pred = predict_logits(model, x, batch_size=batch_size, device=device).argmax(1)
    return float((pred == y.cpu()).float().mean())
