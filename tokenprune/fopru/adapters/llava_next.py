"""FoPru for ``LlavaNextForConditionalGeneration`` (any-res).

LLaVA-NeXT encodes every image as ``1 + n`` square crops of the tower's input size: the *base*
view (the whole image resized) and ``n = nph * npw`` high-resolution crops (chosen from
``config.image_grid_pinpoints``). Its ``pack_image_features`` then builds, per image::

    [base patches (side*side, raster)]
    + for each row r of the big grid (crops tiled nph x npw, each side x side patches,
      then unpadded to the image's aspect ratio):  [row r patches ..., image_newline]

:func:`anyres_layout` maps every packed token to the crop patch it came from (``-1`` = newline)
with the model's own helpers, so the layout is the model's by construction; selection is
:func:`tokenprune.fopru.core.anyres_select` (options ``anyres_norm``, ``newline``; only
``strategy="rank"``: base view and big grid have different row widths). ``keep`` counts the
image's visual tokens; ``kept_indices=`` takes packed positions.
"""

from __future__ import annotations

from typing import Any

import torch

from tokenprune.fopru.core import ANYRES_NORMS, NEWLINE_RULES, AnyResLayout, anyres_select, fopru_scores

from .base import Encoded, FoPruAdapter
from .llava import FEATURE_KEYS, LlavaAdapter
from .registry import register

__all__ = ["LlavaNextAdapter", "anyres_layout"]


def _size_pair(image_size) -> list[int]:
    if isinstance(image_size, torch.Tensor):
        image_size = image_size.tolist()
    try:
        h, w = (int(v) for v in image_size)
    except (TypeError, ValueError):
        raise ValueError(f"image_size must be a pair (height, width), got {image_size!r}") from None
    if h < 1 or w < 1:
        raise ValueError(f"image_size must be positive, got {(h, w)}")
    return [h, w]


def anyres_layout(image_size, grid_pinpoints, crop_size: int, patch_size: int) -> AnyResLayout:
    """Packed token layout of one image, exactly as ``LlavaNextModel.pack_image_features``.

    Args:
        image_size: original ``(height, width)`` (a row of the processor's ``image_sizes``).
        grid_pinpoints: ``config.image_grid_pinpoints``, list of ``(height, width)``.
        crop_size: the vision tower's input size (``vision_config.image_size``).
        patch_size: ``vision_config.patch_size``.

    Returns:
        :class:`~tokenprune.fopru.core.AnyResLayout` (length ``L`` = the image's placeholders).
        Runs the model's own ``get_anyres_image_grid_shape`` and ``unpad_image`` on an index
        tensor, so the ordering and unpadding are the model's.
    """
    from transformers.models.llava_next.modeling_llava_next import (
        get_anyres_image_grid_shape,
        image_size_to_num_patches,
        unpad_image,
    )

    size = _size_pair(image_size)
    if not isinstance(grid_pinpoints, list) or not grid_pinpoints:
        raise ValueError("grid_pinpoints must be a non-empty list of (height, width) pairs")
    crop_size, patch_size = int(crop_size), int(patch_size)
    if crop_size < 1 or patch_size < 1 or crop_size % patch_size:
        raise ValueError(f"crop_size {crop_size} must be a positive multiple of patch_size {patch_size}")
    side = crop_size // patch_size
    p = side * side
    nph, npw = (int(v) for v in get_anyres_image_grid_shape(size, grid_pinpoints, crop_size))
    n = nph * npw
    if image_size_to_num_patches(size, grid_pinpoints, crop_size) != n + 1:
        raise ValueError(
            f"grid_pinpoints {grid_pinpoints} are not multiples of crop_size {crop_size}: "
            "the crop count does not match the crop grid"
        )
    idx = torch.arange(p, (n + 1) * p, dtype=torch.long).view(nph, npw, side, side)
    big = idx.permute(0, 2, 1, 3).reshape(nph * side, npw * side)  # rows of crops, then patch rows
    big = unpad_image(big[None], size)[0]
    hh, ww = big.shape
    packed = torch.cat([big, torch.full((hh, 1), -1, dtype=torch.long)], dim=1)
    source = torch.cat([torch.arange(p, dtype=torch.long), packed.reshape(-1)])
    row = torch.cat(
        [
            torch.arange(side, dtype=torch.long).repeat_interleave(side),
            (side + torch.arange(hh, dtype=torch.long)).repeat_interleave(ww + 1),
        ]
    )
    return AnyResLayout(source, row, n, (nph, npw), side, (int(hh), int(ww)))


@register("llava_next")
class LlavaNextAdapter(LlavaAdapter):
    """LLaVA-NeXT any-res: scores per crop, selection over the packed sequence."""

    family = "LLaVA-NeXT"
    family_options = {"anyres_norm": "sum", "newline": "row"}

    def check_options(self) -> None:
        super().check_options()
        if self.strategy != "rank":
            raise ValueError(
                f"strategy={self.strategy!r} is not supported for LLaVA-NeXT any-res (base view and big "
                "grid have different row widths); use strategy='rank'"
            )
        if self.options["anyres_norm"] not in ANYRES_NORMS:
            raise ValueError(f"unknown anyres_norm {self.options['anyres_norm']!r}; expected one of {ANYRES_NORMS}")
        if self.options["newline"] not in NEWLINE_RULES:
            raise ValueError(f"unknown newline rule {self.options['newline']!r}; expected one of {NEWLINE_RULES}")

    def encode(self, mm: dict[str, Any]) -> Encoded:
        image_sizes = mm.get("image_sizes")
        if image_sizes is None:
            raise ValueError("LLaVA-NeXT needs image_sizes (n_images, 2) in the inputs (the processor returns it)")
        image_sizes = torch.as_tensor(image_sizes)
        if image_sizes.dim() != 2 or image_sizes.shape[1] != 2:
            raise ValueError(f"image_sizes must be (n_images, 2), got {tuple(image_sizes.shape)}")
        cfg = self.model.config
        feature_kwargs = {k: mm[k] for k in FEATURE_KEYS if mm.get(k) is not None}
        out = self.model.get_image_features(
            pixel_values=mm["pixel_values"], image_sizes=image_sizes, return_dict=True, **feature_kwargs
        )
        scores = fopru_scores(self.rows(), method=self.method, num_prefix=int(self.has_cls), check_finite=False)
        vc = cfg.vision_config
        layouts = [anyres_layout(s, cfg.image_grid_pinpoints, vc.image_size, vc.patch_size) for s in image_sizes]
        p = layouts[0].side ** 2 if layouts else 0
        counts = [lay.n_crops + 1 for lay in layouts]
        if scores.shape != (sum(counts), p):
            raise ValueError(
                f"FoPru: captured scores {tuple(scores.shape)} do not match {sum(counts)} crops x {p} "
                "patches (vision_feature_select_strategy must drop exactly the CLS token)"
            )
        feats = list(out.pooler_output)
        for f, lay in zip(feats, layouts):
            if f.shape[0] != len(lay):
                raise ValueError(f"FoPru: packed features have {f.shape[0]} tokens, layout predicts {len(lay)}")
        newline_masks = [lay.is_newline for lay in layouts]
        return Encoded(feats, list(scores.split(counts, dim=0)), {"layouts": layouts, "newline_masks": newline_masks})

    def select(self, enc: Encoded, keeps: list) -> list[torch.Tensor]:
        norm, newline = self.options["anyres_norm"], self.options["newline"]
        return [
            anyres_select(s, lay, kp, anyres_norm=norm, newline=newline)
            for s, lay, kp in zip(enc.scores, enc.info["layouts"], keeps)
        ]

    def kept_from_indices(self, enc: Encoded, kept_indices) -> list[torch.Tensor]:
        return FoPruAdapter.kept_from_indices(self, enc, kept_indices)  # packed positions, not patches

    def stats_extras(self, enc: Encoded, kept: list[torch.Tensor]) -> dict[str, Any]:
        masks = enc.info["newline_masks"]
        newline_kept = [int(nl[k.to(nl.device)].sum()) for nl, k in zip(masks, kept)]
        newline_in = [int(nl.sum()) for nl in masks]
        return {
            "visual_in": [nl.numel() - n for nl, n in zip(masks, newline_in)],
            "visual_kept": [int(k.numel()) - n for k, n in zip(kept, newline_kept)],
            "newline_in": newline_in,
            "newline_kept": newline_kept,
        }
