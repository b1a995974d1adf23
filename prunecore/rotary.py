"""Rotate-half rotary position embeddings (RoPE): the one copy of the tables and the rotation.

Used by the native diffusion LLMs (:mod:`tokenprune.localleap.models`), FoPru's packed-sequence
capture (:mod:`tokenprune.fopru.capture`) and FTP's router.
"""

from __future__ import annotations

import torch

__all__ = ["rotate_half", "apply_rotary", "rotary_cos_sin"]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[-x2, x1]`` where ``x1, x2`` are the two halves of the last dim; shape unchanged."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` computed in the dtype of ``cos``, returned in ``x``'s dtype.

    ``x`` ``(..., D)``; ``cos``, ``sin`` broadcastable to it (e.g. ``(B, 1, L, D)`` for ``(B, H, L, D)``).
    """
    h = x.to(cos.dtype)
    return (h * cos + rotate_half(h) * sin).to(x.dtype)


def rotary_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half RoPE tables over the full head dim: ``(B, L)`` positions -> cos, sin ``(B, 1, L, D)`` float32."""
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim)
    )
    freqs = position_ids.float().unsqueeze(-1) * inv_freq  # (B, L, D/2)
    emb = torch.cat([freqs, freqs], dim=-1).unsqueeze(1)
    return emb.cos(), emb.sin()
