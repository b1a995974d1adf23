"""M-RoPE positions of a prompt whose images were pruned (pure torch; no vLLM import).

The rule is FoPru's for Qwen-VL (:mod:`tokenprune.fopru.adapters.qwen2_vl`): positions are
those of the UNPRUNED prompt, gathered at the kept tokens; nothing shifts. An image whose
merged grid is ``(h, w)`` starts at ``base`` (one past the token before it); its token at
merged ``(r, c)`` sits at ``(base, base + r, base + c)``; the text after it continues at
``base + max(h, w)`` whichever tokens were kept. vLLM writes the kept tokens' positions
itself once the encoder has run (``recompute_mrope_positions``, fed by :func:`image_position_channels`);
:func:`prompt_positions` gives every text position exactly before that, so a prefix-cache hit
never needs the encoder to place the text that follows an image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Media", "grid_positions", "image_position_channels", "prompt_positions"]


@dataclass(frozen=True)
class Media:
    """One image or video in a prompt: its placeholder run and its unpruned position layout.

    ``offset``: index of its first placeholder token; ``relative``: ``(3, n_tokens)`` long
    positions of its placeholder tokens relative to ``base`` (for a pruned image only the
    count matters: vLLM replaces them after the encoder); ``extent``: how far the text after
    it moves (``max(h, w)`` for an image, ``max(relative) + 1`` for a video).
    """

    offset: int
    relative: torch.Tensor
    extent: int


def image_position_channels(grid_hw: tuple[int, int], kept: torch.Tensor) -> torch.Tensor:
    """``(K, 4)`` long: ``(t, row, col, extent)`` of the kept merged tokens of one image.

    ``grid_hw`` is the merged grid ``(h, w)``; ``kept`` ``(K,)`` raster indices. The fourth
    channel is what vLLM's recompute adds to ``base`` for the text after the image:
    ``max(h, w)``, as in the unpruned prompt.
    """
    h, w = (int(g) for g in grid_hw)
    kept = kept.to(torch.long)
    rows, cols = kept // w, kept % w
    extent = torch.full_like(kept, max(h, w))
    return torch.stack([torch.zeros_like(kept), rows, cols, extent], dim=1)


def grid_positions(t: int, h: int, w: int, t_factor: float = 1.0) -> torch.Tensor:
    """``(3, t*h*w)`` long relative positions of an unpruned merged grid (raster order);
    the temporal index is scaled by ``t_factor`` (seconds per grid step x tokens per second)."""
    rel = torch.stack(torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")).reshape(3, -1)
    rel[0] = (rel[0] * t_factor).long()
    return rel


def prompt_positions(n_tokens: int, media: list[Media]) -> tuple[torch.Tensor, int]:
    """``(3, n_tokens)`` M-RoPE positions and the decode delta (``max + 1 - n_tokens``).

    Text tokens count up by one; a media item's tokens sit at ``base + relative``; the text
    after it resumes at ``base + extent``. ``media`` in any order; runs must not overlap.
    """
    out = torch.empty(3, n_tokens, dtype=torch.long)
    pos = cursor = 0
    for m in sorted(media, key=lambda m: m.offset):
        n = m.relative.shape[1]
        if m.offset < cursor or m.offset + n > n_tokens:
            raise ValueError(f"media run [{m.offset}, {m.offset + n}) overlaps another or the prompt end {n_tokens}")
        text = m.offset - cursor
        out[:, cursor : m.offset] = torch.arange(pos, pos + text)
        base = pos + text
        out[:, m.offset : m.offset + n] = m.relative + base
        pos, cursor = base + m.extent, m.offset + n
    out[:, cursor:] = torch.arange(pos, pos + n_tokens - cursor)
    delta = int(out.max()) + 1 - n_tokens if n_tokens else 0
    return out, delta
