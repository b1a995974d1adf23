"""FoPru for ``Qwen2VLForConditionalGeneration``.

* **Scores.** The vision blocks have a fused ``qkv``, 2-D rotary embeddings and no CLS token;
  all images of a call run as ONE packed sequence with block-diagonal attention
  (``cu_seqlens``): :class:`~tokenprune.fopru.capture.PackedQKVCapture` recomputes the column
  means per image (``method="colmean"`` only). ``layer`` indexes blocks like ``hidden_states``
  (``-1`` = the last block, which feeds the merger; ``None`` = ``-2``, the block before it).
* **Merged tokens.** Every 2x2 merge window is contiguous in the packed order and the merger
  emits merged tokens in raster order over ``(h/2, w/2)``: patch scores are pooled per window
  (:func:`~tokenprune.fopru.core.merged_scores_from_packed`) and :func:`fopru_select` runs per
  image on its own merged grid (``keep`` counts merged tokens).
* **Positions.** M-RoPE ``(t, h, w)`` position ids come from the model's own ``get_rope_index``
  on the UNPRUNED prompt; the kept columns are gathered (nothing shifts) and passed as
  ``position_ids`` ``(4, B, L')`` (row 0 = text positions of the shrunk prompt, the layout of
  the model's own ``_prepare_position_ids_for_generation``); ``model.model.rope_deltas`` is set
  for the pruned layout so decode steps continue at ``last + 1``.

Refused with a clear error: videos, images with ``t > 1``, ``method="cls"``, ``grid=``,
a caller's ``position_ids``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tokenprune.fopru.capture import PackedQKVCapture, resolve_layer
from tokenprune.fopru.core import fopru_select, merged_scores_from_packed

from .base import Encoded, FoPruAdapter
from .registry import register

__all__ = ["Qwen2VLAdapter", "qwen_visual"]


def qwen_visual(model: nn.Module) -> nn.Module:
    """The Qwen-VL vision tower (``model.visual`` with ``blocks`` and ``merger``)."""
    for holder in (getattr(model, "model", None), model):
        visual = getattr(holder, "visual", None)
        if visual is not None and hasattr(visual, "blocks") and hasattr(visual, "merger"):
            return visual
    raise TypeError(f"{type(model).__name__}: no Qwen-VL vision tower (model.visual with blocks/merger)")


@register("qwen2_vl")
class Qwen2VLAdapter(FoPruAdapter):
    """Qwen2-VL: packed fused-qkv tower, 2x2 merged tokens, M-RoPE positions."""

    family = "Qwen2-VL"
    input_keys = (
        "pixel_values",
        "image_grid_thw",
        "mm_token_type_ids",
        "position_ids",
    )
    video_keys = ("pixel_values_videos", "video_grid_thw")

    def check_options(self) -> None:
        if self.method == "cls":
            raise ValueError(
                f"method='cls' needs a CLS token; the {self.family} vision tower has none: use method='colmean'"
            )
        if self.grid is not None:
            raise ValueError(f"grid= is not used for {self.family}: each image's merged grid comes from image_grid_thw")
        self.inner = getattr(self.model, "model", self.model)
        if not hasattr(self.inner, "get_rope_index"):
            raise TypeError(f"{type(self.model).__name__}: no get_rope_index (not a Qwen-VL model)")
        self.merge = int(self.model.config.vision_config.spatial_merge_size)

    def make_capture(self) -> PackedQKVCapture:
        blocks = qwen_visual(self.model).blocks
        layer = -2 if self.layer is None else self.layer
        return PackedQKVCapture(blocks[resolve_layer(len(blocks), layer)].attn, method=self.method)

    def check_inputs(self, mm: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Validate the call; returns ``(image_grid_thw (n_images, 3), merged tokens per image)``."""
        if mm.get("position_ids") is not None:
            raise ValueError("position_ids cannot be passed: FoPru computes the M-RoPE positions of the pruned prompt")
        if mm.get("pixel_values") is None:
            raise ValueError("FoPru needs pixel_values")
        grid_thw = mm.get("image_grid_thw")
        if grid_thw is None:
            raise ValueError(f"{self.family} needs image_grid_thw (returned by its processor)")
        grid_thw = torch.as_tensor(grid_thw)
        if grid_thw.dim() != 2 or grid_thw.shape[1] != 3:
            raise ValueError(f"image_grid_thw must be (n_images, 3), got {tuple(grid_thw.shape)}")
        if bool((grid_thw[:, 0] != 1).any()):
            raise ValueError(f"FoPru for {self.family} supports images with t=1 only (image_grid_thw[:, 0] == 1)")
        if bool(((grid_thw[:, 1:] % self.merge) != 0).any()):
            raise ValueError(f"image_grid_thw h/w must be divisible by spatial_merge_size={self.merge}")
        n_patches = grid_thw.prod(-1)
        if mm["pixel_values"].shape[0] != int(n_patches.sum()):
            raise ValueError(
                f"pixel_values has {mm['pixel_values'].shape[0]} patches but image_grid_thw describes "
                f"{int(n_patches.sum())}"
            )
        n_merged = n_patches // self.merge**2
        n_img = int((mm["input_ids"] == self.image_token_id).sum())
        if n_img != int(n_merged.sum()):
            raise ValueError(f"input_ids hold {n_img} image tokens but image_grid_thw gives {int(n_merged.sum())}")
        return grid_thw, n_merged

    def encode(self, mm: dict[str, Any]) -> Encoded:
        grid_thw, n_merged = self.check_inputs(mm)
        out = self.model.get_image_features(pixel_values=mm["pixel_values"], image_grid_thw=grid_thw, return_dict=True)
        patch_scores = self.capture.segment_scores()
        if len(patch_scores) != grid_thw.shape[0]:
            raise RuntimeError(f"captured {len(patch_scores)} attention segments for {grid_thw.shape[0]} images")
        scores = self.merged_scores(patch_scores, grid_thw, n_merged)
        info = {"grid_thw": grid_thw, "grids": grid_thw[:, 1:].tolist(), "outputs": out}
        return Encoded(list(out.pooler_output), scores, info)

    def merged_scores(
        self, patch_scores: list[torch.Tensor], grid_thw: torch.Tensor, n_merged: torch.Tensor
    ) -> list[torch.Tensor]:
        """Per image ``(n_merged_i,)`` scores in the merger's output order, from the captured
        per-image patch scores (packed order: each merged token's patches are consecutive)."""
        return [merged_scores_from_packed(s, g, self.merge) for s, g in zip(patch_scores, grid_thw[:, 1:].tolist())]

    def select(self, enc: Encoded, keeps: list) -> list[torch.Tensor]:
        m = self.merge
        return [  # per image: grids (and K) differ
            fopru_select(
                s[None], kp, strategy=self.strategy, grid=(h // m, w // m), row_mode=self.row_mode, check_finite=False
            )[0]
            for s, (h, w), kp in zip(enc.scores, enc.info["grids"], keeps)
        ]

    def token_tensors(self, mm: dict[str, Any], enc: Encoded) -> dict[str, tuple[torch.Tensor, int]]:
        input_ids = mm["input_ids"]
        mask = mm.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(input_ids)
        mm_tt = mm.get("mm_token_type_ids")
        if mm_tt is None:
            mm_tt = (input_ids == self.image_token_id).int()
        pos3, _ = self.inner.get_rope_index(
            input_ids, mm_token_type_ids=mm_tt, image_grid_thw=enc.info["grid_thw"], attention_mask=mask
        )
        return {"mm_token_type_ids": (mm_tt, 0), "mrope_positions": (pos3, 0)}

    def finish_call(self, call: dict[str, Any], mm: dict[str, Any]) -> None:
        pos3 = call.pop("mrope_positions")
        attended = call["attention_mask"].bool()
        text_pos = (attended.long().cumsum(-1) - 1).masked_fill(~attended, 0)
        call["position_ids"] = torch.cat([text_pos[None].to(pos3.dtype), pos3], dim=0)  # (4, B, L')
        max_pos = pos3.masked_fill(~attended[None], 0).amax(dim=(0, 2))
        self.inner.rope_deltas = (max_pos + 1 - attended.sum(1)).unsqueeze(1)  # model convention, (B, 1)
