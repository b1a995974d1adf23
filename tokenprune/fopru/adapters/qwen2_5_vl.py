"""FoPru for ``Qwen2_5_VLForConditionalGeneration``.

Everything of the Qwen2-VL family (packed fused-qkv tower, 2x2 merged tokens, M-RoPE positions
of the kept tokens) plus windowed vision attention: most blocks attend inside local windows
and only ``fullatt_block_indexes`` attend over the whole image, so the scores come from a
full-attention block (``layer=None``: the last one; a windowed block is refused). Inside the
tower the patches run in *window order* (merge units permuted by the model's own
``get_vision_window_index``); the captured scores are pooled per merge unit in that order and
put back in the merger's output order (raster over the merged grid) with the same index.
"""

from __future__ import annotations

import torch

from tokenprune.fopru.capture import PackedQKVCapture, resolve_layer
from tokenprune.fopru.core import window_merged_scores

from .qwen2_vl import Qwen2VLAdapter, qwen_visual
from .registry import register

__all__ = ["Qwen2_5_VLAdapter"]


@register("qwen2_5_vl")
class Qwen2_5_VLAdapter(Qwen2VLAdapter):
    """Qwen2.5-VL: scores from a full-attention block, un-permuted from window order."""

    family = "Qwen2.5-VL"
    input_keys = (*Qwen2VLAdapter.input_keys, "second_per_grid_ts")

    def make_capture(self) -> PackedQKVCapture:
        visual = qwen_visual(self.model)
        full = sorted(int(i) for i in visual.fullatt_block_indexes)
        if self.layer is None:
            idx = full[-1]
        else:
            idx = resolve_layer(len(visual.blocks), self.layer)
            if idx not in full:
                raise ValueError(
                    f"layer={self.layer} is a windowed-attention block of {self.family}; FoPru scores from a "
                    f"full-attention block: layer in {[i + 1 for i in full]} (hidden_states indexing) or None"
                )
        return PackedQKVCapture(visual.blocks[idx].attn, method=self.method)

    def merged_scores(
        self, patch_scores: list[torch.Tensor], grid_thw: torch.Tensor, n_merged: torch.Tensor
    ) -> list[torch.Tensor]:
        """The tower runs merge units in window order: pool per unit, then undo the order."""
        from transformers.vision_utils import get_vision_window_index

        visual = qwen_visual(self.model)
        window_index, _ = get_vision_window_index(
            grid_thw.cpu(), spatial_merge_size=self.merge, window_size=visual.window_size, patch_size=visual.patch_size
        )
        merged = window_merged_scores(torch.cat(patch_scores), window_index, self.merge)
        return list(merged.split(n_merged.tolist()))
