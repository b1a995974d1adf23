"""Qwen3-VL served by vLLM with FoPru: the kept tokens, and their deepstack features, leave the encoder.

The rule is :class:`tokenprune.fopru.adapters.qwen3_vl.Qwen3VLAdapter`'s (one rule, two runtimes):

* scores: column mean of one vision block's attention (default ``layer=-2``, the block before
  the last, ``hidden_states`` indexing), recomputed from that block's ``q`` and ``k``
  (:func:`tokenprune.fopru.core.packed_colmean`), pooled per merged token
  (:func:`merged_scores_from_packed`: the tower has no windows), ``fopru_select`` per image;
* deepstack: vLLM's tower returns each merged token's main feature and its deepstack features
  side by side in one row, so keeping rows keeps every level at the same tokens;
* positions: the kept tokens keep their unpruned M-RoPE positions and the text after an image
  continues at ``base + max(h, w)``, as in the unpruned prompt. vLLM's own Qwen3-VL recompute
  (5 channels) would restart the text at ``max(kept) + 1`` and shift it; this class carries
  Qwen2.5-VL's 4 channels ``(t, row, col, max(h, w))`` instead and recomputes with that layout.

Videos are refused at start-up when pruning is on (``--limit-mm-per-prompt '{"video": 0}'``):
vLLM lays a Qwen3-VL video out as frames with timestamp tokens whose embeddings and positions
change shape once its multimodal pruning flag is set.
"""

from __future__ import annotations

import torch
from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration
from vllm.model_executor.models.qwen3_vl import (
    Qwen3VLDummyInputsBuilder,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMultiModalProcessor,
    Qwen3VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from tokenprune.fopru.capture import resolve_layer
from tokenprune.fopru.core import fopru_select, merged_scores_from_packed, packed_colmean

from .options import ServeOptions, read_options, served_token_count
from .positions import Media, image_position_channels, prompt_positions
from .qwen2_5_vl import AttentionQK, KeptImagePlaceholders, check_servable

__all__ = ["PrunedQwen3VL", "PrunedQwen3VLProcessor"]

DEFAULT_LAYER = -2  # FoPru's default for the Qwen2-VL / Qwen3-VL towers


class PrunedQwen3VLProcessor(KeptImagePlaceholders, Qwen3VLMultiModalProcessor):
    """vLLM's Qwen3-VL processor with each image's placeholder run cut to the kept count."""


@MULTIMODAL_REGISTRY.register_processor(
    PrunedQwen3VLProcessor, info=Qwen3VLProcessingInfo, dummy_inputs=Qwen3VLDummyInputsBuilder
)
class PrunedQwen3VL(Qwen3VLForConditionalGeneration):
    """Qwen3-VL whose image embeddings (main + deepstack) are FoPru's kept rows (plus 4 position channels)."""

    def __init__(self, *, vllm_config, prefix: str = "model"):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.prunekit: ServeOptions | None = read_options(self.config)
        if self.prunekit is None:
            return
        check_servable(self)
        if self.multimodal_config.get_limit_per_prompt("video") > 0:
            raise ValueError(
                "prunekit vLLM plugin: Qwen3-VL videos are not supported with image pruning; "
                """serve with --limit-mm-per-prompt '{"video": 0}' or drop the prunekit option"""
            )
        layer = DEFAULT_LAYER if self.prunekit.layer is None else self.prunekit.layer
        self.prunekit_attention = self.visual.blocks[resolve_layer(len(self.visual.blocks), layer)].attn.attn
        self.is_multimodal_pruning_enabled = True  # embeddings carry their M-RoPE positions

    def prunekit_kept(self, q, k, cu_seqlens, grids: list[tuple[int, int]]) -> list[torch.Tensor]:
        """Per image (patch grid ``(H, W)``; one frame), the ``(K_i,)`` kept merged-token
        indices (raster order, ascending)."""
        merge = self.visual.spatial_merge_size
        rows = packed_colmean(
            q[0].transpose(0, 1), k[0].transpose(0, 1), cu_seqlens.cpu(), scale=self.prunekit_attention.scale
        )
        kept = []
        for s, (h, w) in zip(rows.mean(0).split([h * w for h, w in grids]), grids):
            merged = merged_scores_from_packed(s, (h, w), merge)
            k_i = served_token_count(merged.numel(), self.prunekit.keep)
            grid = (h // merge, w // merge)
            kept.append(
                fopru_select(merged[None], k_i, strategy=self.prunekit.strategy, grid=grid, check_finite=False)[0]
            )
        return kept

    def _process_image_input(self, image_input) -> tuple[torch.Tensor, ...]:
        if self.prunekit is None:
            return super()._process_image_input(image_input)
        grids = [(h, w) for _, h, w in image_input["image_grid_thw"].tolist()]
        merge = self.visual.spatial_merge_size
        with AttentionQK(self.prunekit_attention) as cap:
            embeds = self.visual(image_input["pixel_values"], grid_thw=image_input["image_grid_thw"].tolist())
        q, k, cu = cap.seen
        kept = self.prunekit_kept(q, k, cu, grids)
        out = []
        for emb, idx, (h, w) in zip(embeds.split([h * w // merge**2 for h, w in grids]), kept, grids):
            pos = image_position_channels((h // merge, w // merge), idx).to(emb.device, emb.dtype)
            out.append(torch.cat([emb[idx], pos], dim=1))  # main and deepstack features of the kept rows
        return tuple(out)

    def _postprocess_image_embeds_evs(self, image_embeds_split, image_input):
        if self.prunekit is None:
            return super()._postprocess_image_embeds_evs(image_embeds_split, image_input)
        return image_embeds_split  # positions appended with the kept rows

    def recompute_mrope_positions(self, input_ids, multimodal_embeddings, mrope_positions, num_computed_tokens):
        """With pruning: the 4-channel recompute (text after an image at ``base + max(h, w)``)."""
        recompute = (
            super().recompute_mrope_positions
            if self.prunekit is None
            else Qwen2_5_VLForConditionalGeneration.recompute_mrope_positions.__get__(self)
        )
        return recompute(input_ids, multimodal_embeddings, mrope_positions, num_computed_tokens)

    def get_mrope_input_positions(self, input_tokens, mm_features):
        """Every text position exact before the encoder runs (the kept images' tokens are
        placed by the recompute)."""
        if self.prunekit is None:
            return super().get_mrope_input_positions(input_tokens, mm_features)
        merge = self.visual.spatial_merge_size
        media = []
        for f in mm_features:
            _, h, w = (int(g) // d for g, d in zip(f.data["image_grid_thw"].data.tolist(), (1, merge, merge)))
            k = served_token_count(h * w, self.prunekit.keep)
            rel = image_position_channels((h, w), torch.arange(k))[:, :3].T
            media.append(Media(f.mm_position.offset, rel, max(h, w)))
        return prompt_positions(len(input_tokens), media)
