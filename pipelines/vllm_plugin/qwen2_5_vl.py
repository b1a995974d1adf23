"""Qwen2.5-VL served by vLLM with FoPru: the kept tokens leave the vision encoder.

Imported by vLLM (lazily, through :func:`pipelines.vllm_plugin.register`) in the processes
that build the model or its processor. With no ``prunekit`` options on the config both
classes are exactly vLLM's. With options:

* the processor sizes each image's placeholder run to ``served_token_count(n, keep)``
  merged tokens (known before the encoder runs, as vLLM requires);
* the model scores every merged token from one full-attention vision block (column mean of
  the block-diagonal attention, recomputed from that block's ``q`` and ``k`` with
  :func:`tokenprune.fopru.core.packed_colmean`, then :func:`window_merged_scores`), keeps
  ``fopru_select``'s tokens in raster order, and appends their M-RoPE positions so that the
  runner's ``recompute_mrope_positions`` places them (the plugin turns that call on for
  images; vLLM 0.32 does it only for video pruning).
"""

from __future__ import annotations

from functools import partial

import torch
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.processing import PromptReplacement

from tokenprune.fopru.capture import resolve_layer
from tokenprune.fopru.core import fopru_select, packed_colmean, window_merged_scores

from .options import ServeOptions, read_options, served_token_count
from .positions import Media, grid_positions, image_position_channels, prompt_positions

__all__ = ["AttentionQK", "KeptImagePlaceholders", "PrunedQwen2_5_VL", "PrunedQwen2_5_VLProcessor", "check_servable"]


class KeptImagePlaceholders:
    """Processor mixin (before vLLM's Qwen-VL processor in the bases): each image's
    placeholder run is cut to the kept count; videos and unset options pass unchanged."""

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        opts = read_options(self.info.get_hf_config())
        if opts is None:
            return updates

        def kept_run(item_idx: int, full) -> list[int]:
            run = full(item_idx)
            return run[: served_token_count(len(run), opts.keep)]

        return [
            PromptReplacement(u.modality, u.target, partial(kept_run, full=u.replacement))
            if u.modality == "image"
            else u
            for u in updates
        ]


class PrunedQwen2_5_VLProcessor(KeptImagePlaceholders, Qwen2_5_VLMultiModalProcessor):
    """vLLM's Qwen2.5-VL processor with each image's placeholder run cut to the kept count."""


class AttentionQK:
    """Forward pre-hook on one vision block's encoder attention: keeps its ``q``, ``k``, ``cu_seqlens``."""

    def __init__(self, attn: torch.nn.Module):
        self.attn = attn
        self.seen: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def __call__(self, _mod, args, kwargs):
        q = kwargs.get("query", args[0] if args else None)
        k = kwargs.get("key", args[1] if len(args) > 1 else None)
        cu = kwargs.get("cu_seqlens", args[3] if len(args) > 3 else None)
        self.seen = (q, k, cu)

    def __enter__(self):
        self.seen = None
        self.handle = self.attn.register_forward_pre_hook(self, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def check_servable(model) -> None:
    """Refuse, at start-up, a setting whose image embeddings FoPru cannot score."""
    if getattr(model.multimodal_config, "enable_mm_embeds", False):
        raise ValueError(
            "prunekit vLLM plugin: --enable-mm-embeds passes image embeddings that FoPru cannot score "
            "(it needs the vision encoder's attention); drop that flag or the prunekit option"
        )
    if model.use_data_parallel or get_tensor_model_parallel_world_size() > 1:
        raise ValueError(
            "prunekit vLLM plugin: a vision encoder split over several ranks is not supported; "
            "serve with --tensor-parallel-size 1 and the default --mm-encoder-tp-mode"
        )


@MULTIMODAL_REGISTRY.register_processor(
    PrunedQwen2_5_VLProcessor, info=Qwen2_5_VLProcessingInfo, dummy_inputs=Qwen2_5_VLDummyInputsBuilder
)
class PrunedQwen2_5_VL(Qwen2_5_VLForConditionalGeneration):
    """Qwen2.5-VL whose image embeddings are FoPru's kept tokens (plus 4 position channels)."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.prunekit: ServeOptions | None = read_options(self.config)
        if self.prunekit is None:
            return
        check_servable(self)
        full = sorted(int(i) for i in self.visual.fullatt_block_indexes)
        if self.prunekit.layer is None:
            block = full[-1]
        else:
            block = resolve_layer(len(self.visual.blocks), self.prunekit.layer)
            if block not in full:
                raise ValueError(
                    f"prunekit vLLM plugin: layer={self.prunekit.layer} is a windowed-attention block; "
                    f"pass a full-attention block, layer in {[i + 1 for i in full]}, or omit it"
                )
        self.prunekit_attention = self.visual.blocks[block].attn.attn
        self.is_multimodal_pruning_enabled = True  # embeddings carry their M-RoPE positions

    def prunekit_kept(self, q, k, cu_seqlens, window_index, merged_grids: list[tuple[int, int]]) -> list[torch.Tensor]:
        """Per image (merged grid ``(h, w)``; images have one frame), the ``(K_i,)`` kept
        merged-token indices (raster order, ascending)."""
        attn = self.prunekit_attention
        rows = packed_colmean(q[0].transpose(0, 1), k[0].transpose(0, 1), cu_seqlens.cpu(), scale=attn.scale)
        merged = window_merged_scores(rows.mean(0), window_index, self.visual.spatial_merge_size)
        kept = []
        for s, grid in zip(merged.split([h * w for h, w in merged_grids]), merged_grids):
            k_i = served_token_count(s.numel(), self.prunekit.keep)
            kept.append(fopru_select(s[None], k_i, strategy=self.prunekit.strategy, grid=grid, check_finite=False)[0])
        return kept

    def _process_image_input(self, image_input) -> tuple[torch.Tensor, ...]:
        if self.prunekit is None:
            return super()._process_image_input(image_input)
        grids = image_input["image_grid_thw"].tolist()
        merge = self.visual.spatial_merge_size
        merged_grids = [(h // merge, w // merge) for _, h, w in grids]
        meta = self.visual.prepare_encoder_metadata(grids)
        with AttentionQK(self.prunekit_attention) as cap:
            embeds = self.visual(image_input["pixel_values"], grid_thw=grids, encoder_metadata=meta)
        q, k, cu = cap.seen
        kept = self.prunekit_kept(q, k, cu, meta["window_index"], merged_grids)
        out = []
        for emb, idx, grid in zip(embeds.split([h * w for h, w in merged_grids]), kept, merged_grids):
            pos = image_position_channels(grid, idx).to(emb.device, emb.dtype)
            out.append(torch.cat([emb[idx], pos], dim=1))
        return tuple(out)

    def _postprocess_image_embeds_evs(self, image_embeds_split, image_input):
        if self.prunekit is None:
            return super()._postprocess_image_embeds_evs(image_embeds_split, image_input)
        return image_embeds_split  # positions appended with the kept rows

    def _postprocess_video_embeds_evs(self, video_embeds_split, video_input):
        """Videos pass unpruned (FoPru prunes images) unless vLLM's own video pruning is on;
        either way their embeddings carry positions, as the recompute expects."""
        if self.prunekit is None or self.video_pruning_rate:
            return super()._postprocess_video_embeds_evs(video_embeds_split, video_input)
        merge = self.visual.spatial_merge_size
        seconds = video_input.get("second_per_grid_ts")
        per_second = float(getattr(self.config.vision_config, "tokens_per_second", 1.0))
        out = []
        for i, (emb, (t, h, w)) in enumerate(zip(video_embeds_split, video_input["video_grid_thw"].tolist())):
            t_factor = (float(seconds[i]) if seconds is not None else 1.0) * per_second
            rel = grid_positions(t, h // merge, w // merge, t_factor)
            extent = torch.full((1, rel.shape[1]), int(rel.max()) + 1)
            out.append(torch.cat([emb, torch.cat([rel, extent]).T.to(emb.device, emb.dtype)], dim=1))
        return tuple(out)

    def get_mrope_input_positions(self, input_tokens, mm_features):
        if self.prunekit is None:
            return super().get_mrope_input_positions(input_tokens, mm_features)
        media = []
        for offset, t, h, w, t_factor in self.iter_mm_grid_thw(mm_features):
            if t == 1 and t_factor == 1.0 and self.is_image_at(mm_features, offset):
                k = served_token_count(h * w, self.prunekit.keep)
                rel = image_position_channels((h, w), torch.arange(k))[:, :3].T
                media.append(Media(offset, rel, max(h, w)))
            else:
                rel = grid_positions(t, h, w, t_factor)
                media.append(Media(offset, rel, int(rel.max()) + 1))
        return prompt_positions(len(input_tokens), media)

    @staticmethod
    def is_image_at(mm_features, offset: int) -> bool:
        return any(f.mm_position.offset == offset and f.modality == "image" for f in mm_features)
