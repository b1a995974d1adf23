"""FoPru for ``Qwen3VLForConditionalGeneration``.

The Qwen2-VL family's tower and prompt layout (packed fused-qkv blocks with full attention per
image, 2x2 merged tokens, M-RoPE positions of the kept tokens), plus *deepstack*: the outputs
of a few vision blocks (``deepstack_visual_indexes``) are merged to the same merged tokens and
added to the LLM's hidden states at the visual positions of its first layers. FoPru gathers
every deepstack level at the kept merged tokens, so the LLM gets, at each kept position, the
main feature and the deepstack features of the same token. They can only travel with the
features in ``mm_encoder_outputs`` (``feature_passing="inputs_embeds"`` is refused: the
deepstack features would be lost).
"""

from __future__ import annotations

from typing import Any

import torch

from .base import Encoded
from .qwen2_vl import Qwen2VLAdapter
from .registry import register

__all__ = ["Qwen3VLAdapter"]


@register("qwen3_vl")
class Qwen3VLAdapter(Qwen2VLAdapter):
    """Qwen3-VL: Qwen2-VL scoring and positions, deepstack features pruned like the main ones."""

    family = "Qwen3-VL"

    def check_options(self) -> None:
        super().check_options()
        if self.feature_passing != "mm_encoder_outputs":
            raise ValueError(
                "Qwen3-VL's deepstack features only travel in mm_encoder_outputs: use feature_passing="
                "'mm_encoder_outputs' (or 'auto')"
            )

    def feature_inputs(
        self, new_ids: torch.Tensor, pruned: list[torch.Tensor], enc: Encoded, kept: list[torch.Tensor]
    ) -> dict[str, Any]:
        from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

        levels = enc.info["outputs"].deepstack_features  # per level, per image (n_merged_i, D)
        deepstack = [[f[k.to(f.device)] for f, k in zip(level, kept)] for level in levels]
        image = BaseModelOutputWithDeepstackFeatures(pooler_output=pruned, deepstack_features=deepstack)
        return {"mm_encoder_outputs": {"image": image}}
