"""FoPru for ``LlavaOnevisionForConditionalGeneration`` (any-res, CLS-free SigLIP tower).

LLaVA-OneVision packs an image like LLaVA-NeXT (base view, then the unpadded crop grid with a
newline closing each row) with two differences: a big grid larger than ``anyres_max_N`` crops
is bilinearly downsampled (``vision_aspect_ratio``), and in a prompt with several images
(``batch_num_images``) each image is one crop followed by one newline. So that the layout is
the model's by construction, the scores are packed by the model's own ``pack_image_features``:
each crop's patch scores (``method="colmean"`` for SigLIP, normalised per crop by
``anyres_norm``) go through it as a 3-channel "feature" ``[score, newline, crop grid]`` with
the newline vector ``[0, 1, 1]``: the packed channel 0 is every token's score (interpolated
exactly like the features when the grid is downsampled), channel 1 marks the newlines and
channel 2 the crop-grid tokens (base view 0). Selection is
:func:`~tokenprune.fopru.core.packed_select` (options ``anyres_norm``, ``newline`` as for
LLaVA-NeXT; ``strategy="rank"`` only). ``image_sizes`` is required (the processor returns it).
"""

from __future__ import annotations

from typing import Any

import torch

from tokenprune.fopru.core import fopru_scores, normalise_crop_scores, packed_select

from .base import Encoded
from .llava import FEATURE_KEYS
from .llava_next import LlavaNextAdapter
from .registry import register

__all__ = ["LlavaOnevisionAdapter"]

ONEVISION_KEYS = (*FEATURE_KEYS, "vision_aspect_ratio", "batch_num_images")


@register("llava_onevision")
class LlavaOnevisionAdapter(LlavaNextAdapter):
    """LLaVA-OneVision: any-res packing (with downsampling) read from the model's own packer."""

    family = "LLaVA-OneVision"
    input_keys = ("pixel_values", "image_sizes", *ONEVISION_KEYS)
    video_keys = ("pixel_values_videos", "image_sizes_videos")

    def crops_per_image(self, image_sizes: torch.Tensor, batch_num_images) -> list[int]:
        """Crops the model encodes per image (1 for every image of a multi-image prompt)."""
        from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

        cfg = self.model.config
        n = image_sizes.shape[0]
        single = [True] * n if batch_num_images is None else [int(k) == 1 for k in batch_num_images for _ in range(k)]
        if len(single) != n:
            raise ValueError(f"batch_num_images sums to {len(single)} images but image_sizes has {n}")
        return [
            image_size_to_num_patches(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size) if one else 1
            for size, one in zip(image_sizes, single)
        ]

    def encode(self, mm: dict[str, Any]) -> Encoded:
        image_sizes = mm.get("image_sizes")
        if image_sizes is None:
            raise ValueError("LLaVA-OneVision needs image_sizes (n_images, 2) in the inputs (the processor returns it)")
        image_sizes = torch.as_tensor(image_sizes)
        cfg = self.model.config
        feature_kwargs = {k: mm[k] for k in ONEVISION_KEYS if mm.get(k) is not None}
        out = self.model.get_image_features(
            pixel_values=mm["pixel_values"], image_sizes=image_sizes, return_dict=True, **feature_kwargs
        )
        scores = fopru_scores(self.rows(), method=self.method, num_prefix=int(self.has_cls), check_finite=False)
        counts = self.crops_per_image(image_sizes, mm.get("batch_num_images"))
        if scores.shape[0] != sum(counts):
            raise ValueError(f"FoPru: captured {scores.shape[0]} crops, the model encodes {sum(counts)}")
        channels = []
        for crop_scores in scores.split(counts, dim=0):
            s = normalise_crop_scores(crop_scores, self.options["anyres_norm"])
            grid_flag = torch.ones_like(s)
            grid_flag[0] = 0 if s.shape[0] > 1 else 1  # the base view of a multi-crop image
            channels.append(torch.stack([s, torch.zeros_like(s), grid_flag], dim=-1))  # (crops, P, 3)
        marker = torch.tensor([0.0, 1.0, 1.0], device=scores.device)
        aspect = mm.get("vision_aspect_ratio") or cfg.vision_aspect_ratio
        packed, _ = self.model.model.pack_image_features(
            channels, image_sizes, image_newline=marker, vision_aspect_ratio=aspect
        )
        feats = list(out.pooler_output)
        token_scores, newline_masks, rows = [], [], []
        for f, p in zip(feats, packed):
            if f.shape[0] != p.shape[0]:
                raise ValueError(f"FoPru: packed features have {f.shape[0]} tokens, packed scores {p.shape[0]}")
            is_nl = p[:, 1] > 0.5
            row = torch.cumsum(is_nl.long(), 0) - is_nl.long() + (p[:, 2] > 0.5).long()  # base 0, grid row r -> r+1
            row = torch.where(is_nl, torch.cat([row[:1], row[:-1]]), row)  # a newline closes the row before it
            token_scores.append(p[:, 0])
            newline_masks.append(is_nl)
            rows.append(row)
        return Encoded(feats, token_scores, {"newline_masks": newline_masks, "rows": rows})

    def select(self, enc: Encoded, keeps: list) -> list[torch.Tensor]:
        newline = self.options["newline"]
        return [
            packed_select(s, nl, row, kp, newline=newline)
            for s, nl, row, kp in zip(enc.scores, enc.info["newline_masks"], enc.info["rows"], keeps)
        ]
