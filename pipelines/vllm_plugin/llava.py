"""LLaVA-1.5 served by vLLM with FoPru: the kept patch tokens leave the CLIP tower.

Imported by vLLM (lazily, through :func:`pipelines.vllm_plugin.register`). With no
``prunekit`` options on the config both classes are exactly vLLM's. With options:

* the processor sizes each image's placeholder run to ``served_token_count(n, keep)`` patch
  tokens (plus the CLS feature under ``vision_feature_select_strategy="full"``, which FoPru
  always keeps): LLaVA-1.5 crops every image to one fixed size, so ``n`` (576 at 336 px) is
  known before the encoder runs;
* the model scores the patches from the CLS row of one CLIP layer's attention (``method="cls"``,
  FoPru's paper rule, as :mod:`tokenprune.fopru.adapters.llava`): vLLM's fused encoder
  attention returns no probabilities, so the row ``softmax(q_cls k^T * scale)`` is recomputed
  from that layer's ``q`` and ``k`` (:func:`.llava_scores.cls_attention_rows`) and reduced with
  :func:`tokenprune.fopru.core.fopru_scores`; ``fopru_select`` picks the kept patches, which
  reach the language model in raster order. LLaVA's positions are 1-D: the kept tokens sit
  one after another, as in the transformers runtime, and vLLM needs no position work.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.processing import PromptReplacement

from tokenprune.fopru.capture import resolve_layer
from tokenprune.fopru.core import fopru_scores, fopru_select

from .llava_scores import LLAVA_METHODS, cls_attention_rows, feature_prefix, kept_run_length
from .options import ServeOptions, read_options, served_token_count
from .qwen2_5_vl import AttentionQK  # the q/k hook on a vLLM encoder attention

__all__ = ["PrunedLlava", "PrunedLlavaProcessor"]


class PrunedLlavaProcessor(LlavaMultiModalProcessor):
    """vLLM's LLaVA processor with each image's placeholder run cut to the kept count."""

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        opts = read_options(self.info.get_hf_config(), methods=LLAVA_METHODS)
        if opts is None:
            return updates
        n_patch = self.info.get_vision_encoder_info().get_patch_grid_length() ** 2

        def kept_run(item_idx: int, full) -> list[int]:
            run = full(item_idx)
            return run[: kept_run_length(len(run), n_patch, opts.keep)]

        return [
            PromptReplacement(u.modality, u.target, partial(kept_run, full=u.replacement))
            if u.modality == "image"
            else u
            for u in updates
        ]


@MULTIMODAL_REGISTRY.register_processor(
    PrunedLlavaProcessor, info=LlavaProcessingInfo, dummy_inputs=LlavaDummyInputsBuilder
)
class PrunedLlava(LlavaForConditionalGeneration):
    """LLaVA-1.5 (CLIP tower) whose image embeddings are FoPru's kept tokens."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.prunekit: ServeOptions | None = read_options(self.config, methods=LLAVA_METHODS)
        if self.prunekit is None:
            return
        vision = self.config.vision_config
        if vision.model_type != "clip_vision_model":
            raise ValueError(
                f"prunekit vLLM plugin: the {vision.model_type!r} vision tower is not supported for LLaVA "
                "(FoPru's CLS rule needs CLIP); serve a CLIP-tower LLaVA or drop the prunekit option"
            )
        if getattr(self.multimodal_config, "enable_mm_embeds", False):
            raise ValueError(
                "prunekit vLLM plugin: --enable-mm-embeds passes image embeddings that FoPru cannot score "
                "(it needs the vision encoder's attention); drop that flag or the prunekit option"
            )
        if get_tensor_model_parallel_world_size() > 1:
            raise ValueError(
                "prunekit vLLM plugin: a vision encoder split over several ranks is not supported; "
                "serve with --tensor-parallel-size 1"
            )
        if not isinstance(self.config.vision_feature_layer, int):
            raise ValueError(
                "prunekit vLLM plugin: FoPru supports a single vision_feature_layer (int), not a list; "
                "serve a model with one feature layer or drop the prunekit option"
            )
        self.prunekit_prefix = feature_prefix(self.config)
        layer = self.config.vision_feature_layer if self.prunekit.layer is None else self.prunekit.layer
        layers = self.vision_tower.vision_model.encoder.layers  # vLLM builds only up to the feature layer
        block = resolve_layer(vision.num_hidden_layers, layer)
        if block >= len(layers):
            raise ValueError(
                f"prunekit vLLM plugin: layer={layer} is deeper than the feature layer "
                f"(vision_feature_layer={self.config.vision_feature_layer}); pass a layer at or before it, or omit it"
            )
        self.prunekit_attention = layers[block].self_attn

    def prunekit_kept(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """``(B, K)`` kept patch indices (ascending = raster order) from one layer's ``q``, ``k``."""
        attn = self.prunekit_attention
        rows = cls_attention_rows(q, k, attn.num_heads_per_partition, attn.scale)
        scores = fopru_scores(rows, method="cls", check_finite=False)
        n_keep = served_token_count(scores.shape[1], self.prunekit.keep)
        side = math.isqrt(scores.shape[1])  # CLIP crops are square
        grid = (side, side) if side * side == scores.shape[1] else None
        return fopru_select(scores, n_keep, strategy=self.prunekit.strategy, grid=grid, check_finite=False)

    def _process_image_input(self, image_input) -> tuple[torch.Tensor, ...]:
        if self.prunekit is None:
            return super()._process_image_input(image_input)
        with AttentionQK(self.prunekit_attention.attn) as cap:
            features = self._process_image_pixels(image_input)  # (B, prefix + N_patch, D)
        q, k, _ = cap.seen  # CLIP attends over the whole image: no segments
        kept = self.prunekit_kept(q, k)
        n = self.prunekit_prefix
        head = torch.arange(n, device=kept.device).expand(kept.shape[0], n)
        rows = torch.cat([head, kept + n], dim=1)
        chosen = features.gather(1, rows[..., None].expand(-1, -1, features.shape[-1]))
        return tuple(self.multi_modal_projector(chosen).unbind(0))
