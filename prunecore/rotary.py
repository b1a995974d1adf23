"""Rotary position embeddings in the rotate-half layout (Llama, Qwen, Mistral, Phi, GPT-NeoX).

Pure torch, shared by every method that recomputes a model's rotary (FTP's score feature,
LocalLeap's native blocks, FoPru's vision capture).
"""

from __future__ import annotations

import torch

__all__ = ["apply_rotary", "rotary_cos_sin", "rotate_half"]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``(x1, x2) -> (-x2, x1)`` over the halves of the last dim; ``x`` ``(..., D)`` -> ``(..., D)``, D even."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotary_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half RoPE tables over the full head dim: ``(B, L)`` positions -> cos, sin ``(B, 1, L, D)`` float32.

    ``inv_freq[j] = theta ** (-2j / D)``; the angle of position ``p`` and channel ``c`` is
    ``p * inv_freq[c mod D/2]`` (both halves share the frequencies). The extra dim 1 broadcasts
    over attention heads.
    """
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim)
    )
    freqs = position_ids.float().unsqueeze(-1) * inv_freq  # (B, L, D/2)
    emb = torch.cat([freqs, freqs], dim=-1).unsqueeze(1)  # (B, 1, L, D)
    return emb.cos(), emb.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` on the first ``d`` channels, computed in the dtype of ``cos``.

    Args:
        x: ``(..., D)``, e.g. ``(B, H, L, D)`` queries or keys.
        cos, sin: ``(..., d)`` tables broadcastable to ``x[..., :d]``, ``d <= D`` and even; ``d == D``
            is the Llama case, ``d < D`` the partial-rotary convention of Phi / GPT-NeoX /
            StableLM (the channels after ``d`` pass unchanged).
    Returns:
        ``(..., D)`` in the dtype of ``x``.
    """
    d = cos.shape[-1]
    h = x.to(cos.dtype)
    rot = h if d == h.shape[-1] else h[..., :d]
    rot = rot * cos + rotate_half(rot) * sin
    if d != h.shape[-1]:
        rot = torch.cat([rot, h[..., d:]], dim=-1)
    return rot.to(x.dtype)
