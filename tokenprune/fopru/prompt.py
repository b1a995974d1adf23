"""Prompt compaction: shrink each image's placeholder run in ``input_ids`` / ``attention_mask``
(and any other per-token tensor) to its kept tokens and rebuild the padding to the shortest
width, with one host synchronisation (:func:`shrink_prompt`, :func:`prune_mm_inputs`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = [
    "image_keep_mask",
    "compact_tokens",
    "shrink_prompt",
    "prune_mm_inputs",
]


# --------------------------------------------------------------------------- prompt compaction
def _flat_kept(kept: Sequence[torch.Tensor], tokens_per_image: Sequence[int], device) -> torch.Tensor:
    """Kept positions of all images as indices into the concatenated image tokens."""
    sizes = {int(k.numel()) for k in kept}
    if len(set(tokens_per_image)) == 1 and len(sizes) == 1:  # the common case: one kernel, no Python loop
        n = int(tokens_per_image[0])
        stacked = torch.stack([k.to(device) for k in kept])
        return (stacked + torch.arange(0, n * len(kept), n, device=device)[:, None]).reshape(-1)
    offsets = [0]
    for n in tokens_per_image[:-1]:
        offsets.append(offsets[-1] + int(n))
    return torch.cat([k.to(device) + off for k, off in zip(kept, offsets)])


def image_keep_mask(
    input_ids: torch.Tensor, image_token_id: int, tokens_per_image: Sequence[int], kept: Sequence[torch.Tensor]
) -> torch.Tensor:
    """``(B, L)`` bool: True for text tokens and for the kept positions of every image's run.

    Args:
        input_ids: ``(B, L)``; image placeholders appear, in order, as one run per image
            (images numbered row-major over the batch, the order of ``masked_scatter``).
        image_token_id: the placeholder id.
        tokens_per_image: ``N_i`` placeholders per image (their sum must be the number of
            placeholders: :func:`shrink_prompt` checks it).
        kept: per image, sorted positions in ``[0, N_i)``.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (B, L), got {tuple(input_ids.shape)}")
    total = int(sum(int(n) for n in tokens_per_image))
    is_img = input_ids == image_token_id
    img_keep = torch.zeros(total, dtype=torch.bool, device=input_ids.device)
    img_keep[_flat_kept(kept, tokens_per_image, input_ids.device)] = True
    ordinal = (is_img.reshape(-1).long().cumsum(0) - 1).clamp(0, max(total - 1, 0))  # rank among placeholders
    return ~is_img | img_keep[ordinal].view_as(is_img)


def _compact(
    keep: torch.Tensor, attention_mask: torch.Tensor, tensors, lengths: torch.Tensor, new_len: int, left: bool
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    b, L = keep.shape
    col = keep.long().cumsum(1) - 1
    if left:
        col = col + (new_len - lengths)[:, None]
    rows = torch.arange(b, device=keep.device)[:, None].expand(b, L)
    r, c = rows[keep], col[keep]
    new_mask = torch.zeros((b, new_len), dtype=attention_mask.dtype, device=attention_mask.device)
    new_mask[r, c] = attention_mask[keep]
    outs = []
    for x, pad in tensors:
        y = torch.full((*x.shape[:-2], b, new_len), pad, dtype=x.dtype, device=x.device)
        y[..., r, c] = x[..., keep]
        outs.append(y)
    return new_mask, outs


def _padding_side(padding_side: str | None, right_padded: bool) -> bool:
    """True for left padding."""
    if padding_side is None:
        return not right_padded
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    return padding_side == "left"


def compact_tokens(
    keep: torch.Tensor,
    attention_mask: torch.Tensor,
    tensors: Sequence[tuple[torch.Tensor, int]],
    *,
    padding_side: str | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Drop the columns ``~keep`` of every row and re-pad rows to the longest one.

    Args:
        keep: ``(B, L)`` bool, columns to keep.
        attention_mask: ``(B, L)``.
        tensors: ``(x, pad_value)`` pairs, ``x`` of shape ``(..., B, L)`` (input ids, labels,
            ``(3, B, L)`` M-RoPE position ids, ...) compacted the same way.
        padding_side: ``"left"``/``"right"``; None = the side the input was padded on (right
            only if some row ends with a masked position; left otherwise, which is what
            decoder-only generation needs).

    Returns:
        ``(new_attention_mask (B, L'), [new x (..., B, L') per input])``.
    """
    lengths = keep.sum(1)
    host = torch.cat([lengths.max().view(1), (attention_mask[:, -1] == 0).any().view(1).long()]).tolist()
    return _compact(keep, attention_mask, tensors, lengths, host[0], _padding_side(padding_side, bool(host[1])))


def shrink_prompt(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    image_token_id: int,
    tokens_per_image: Sequence[int],
    kept: Sequence[torch.Tensor],
    tensors: Sequence[tuple[torch.Tensor, int]],
    *,
    padding_side: str | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor], list[int], list[int]]:
    """Shrink every image's placeholder run to its kept positions, drop padding and re-pad to
    the shortest width, with ONE host synchronisation (the new width is a shape).

    Args:
        input_ids, attention_mask: ``(B, L)``.
        image_token_id, tokens_per_image, kept: as in :func:`image_keep_mask`.
        tensors: ``(x, pad_value)`` pairs ``(..., B, L)`` to shrink alike (``input_ids`` itself
            must be one of them if the shrunk ids are wanted).
        padding_side: as in :func:`compact_tokens`.

    Returns:
        ``(new_attention_mask (B, L'), [shrunk tensors], attended tokens per row before, after)``.
    """
    keep = image_keep_mask(input_ids, image_token_id, tokens_per_image, kept) & attention_mask.bool()
    lengths = keep.sum(1)
    right = (attention_mask[:, -1] == 0).any().view(1).long()
    n_img = (input_ids == image_token_id).sum().view(1)
    host = torch.cat([n_img, right, attention_mask.sum(1).long(), lengths]).tolist()
    b = input_ids.shape[0]
    total = int(sum(int(n) for n in tokens_per_image))
    if host[0] != total:
        raise ValueError(f"input_ids hold {host[0]} image tokens but the images have {total} features")
    tokens_in, tokens_out = host[2 : 2 + b], host[2 + b :]
    left = _padding_side(padding_side, bool(host[1]))
    new_mask, outs = _compact(keep, attention_mask, tensors, lengths, max(tokens_out), left)
    return new_mask, outs, tokens_in, tokens_out


def prune_mm_inputs(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    image_token_id: int,
    tokens_per_image: Sequence[int],
    kept: Sequence[torch.Tensor],
    *,
    pad_token_id: int = 0,
    padding_side: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shrink each image's placeholder run to its kept tokens: ``(input_ids, attention_mask)``
    ``(B, L')``, padding rebuilt to the shortest width (see :func:`shrink_prompt`)."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (B, L), got {tuple(input_ids.shape)}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    new_mask, (new_ids,), _, _ = shrink_prompt(
        input_ids,
        attention_mask,
        image_token_id,
        tokens_per_image,
        kept,
        [(input_ids, pad_token_id)],
        padding_side=padding_side,
    )
    return new_ids, new_mask
