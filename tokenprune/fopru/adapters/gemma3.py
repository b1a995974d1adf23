"""FoPru for ``Gemma3ForConditionalGeneration``.

Gemma 3 encodes each image with a SigLIP tower (no CLS token: ``method="colmean"``) into a
``P x P`` patch grid and its projector average-pools it to a fixed number of soft tokens,
``T x T = mm_tokens_per_image`` (896 px / patch 14: 64 x 64 patches -> 16 x 16 = 256 tokens,
pool kernel ``P / T``). FoPru scores the LLM's tokens on that pooled grid: the patch scores of
the last encoder layer (``layer=None`` = -1, the layer whose output is pooled) are averaged
over each token's ``k x k`` patch window (:func:`merge_grid_scores`), then ``keep`` counts soft
tokens and ``strategy="row"`` works on the ``T x T`` grid. The prompt's ``token_type_ids``
(which make the image tokens attend to each other bidirectionally) are shrunk with it.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from tokenprune.fopru.capture import AttentionRowCapture
from tokenprune.fopru.core import fopru_scores, merge_grid_scores, select_per_image

from .base import Encoded, FoPruAdapter
from .registry import register

__all__ = ["Gemma3Adapter"]


@register("gemma3")
class Gemma3Adapter(FoPruAdapter):
    """Gemma 3: SigLIP patches pooled to a fixed soft-token grid; scores on the pooled grid."""

    family = "Gemma3"
    input_keys = ("pixel_values", "token_type_ids")

    def check_options(self) -> None:
        if self.method == "cls":
            raise ValueError("method='cls' needs a CLS token; the Gemma3 SigLIP tower has none: use method='colmean'")
        if self.feature_passing != "mm_encoder_outputs":
            raise ValueError(
                "Gemma3's generate does not take inputs_embeds: use feature_passing='mm_encoder_outputs' (or 'auto')"
            )
        cfg = self.model.config
        self.patches = int(cfg.vision_config.image_size // cfg.vision_config.patch_size)
        self.tokens_side = math.isqrt(int(cfg.mm_tokens_per_image))
        if self.tokens_side**2 != cfg.mm_tokens_per_image or self.patches % self.tokens_side:
            raise ValueError(
                f"Gemma3 config: mm_tokens_per_image={cfg.mm_tokens_per_image} must be a square whose side "
                f"divides the {self.patches} x {self.patches} patch grid"
            )
        if self.grid is not None and tuple(self.grid) != (self.tokens_side, self.tokens_side):
            raise ValueError(
                f"grid= must be the pooled grid {(self.tokens_side, self.tokens_side)} for Gemma3 (or None)"
            )

    def make_capture(self) -> AttentionRowCapture:
        return AttentionRowCapture.for_model(
            self.model, layer=-1 if self.layer is None else self.layer, method="colmean"
        )

    def encode(self, mm: dict[str, Any]) -> Encoded:
        out = self.model.get_image_features(pixel_values=mm["pixel_values"], return_dict=True)
        if self.capture.rows is None:
            raise RuntimeError("FoPru capture hooks did not fire: the chosen vision layer was not run")
        patch_scores = fopru_scores(self.capture.rows, method="colmean", check_finite=False)  # (n_images, P*P), raster
        kernel = self.patches // self.tokens_side
        scores = merge_grid_scores(patch_scores, (self.patches, self.patches), kernel)  # (n_images, T*T)
        return Encoded(list(out.pooler_output.unbind(0)), scores)

    def select(self, enc: Encoded, keeps: list) -> list[torch.Tensor]:
        side = self.tokens_side
        return select_per_image(enc.scores, keeps, strategy=self.strategy, grid=(side, side), row_mode=self.row_mode)

    def token_tensors(self, mm: dict[str, Any], enc: Encoded) -> dict[str, tuple[torch.Tensor, int]]:
        tt = mm.get("token_type_ids")
        return {} if tt is None else {"token_type_ids": (tt, 0)}

    def feature_inputs(
        self, new_ids: torch.Tensor, pruned: list[torch.Tensor], enc: Encoded, kept: list[torch.Tensor]
    ) -> dict[str, Any]:
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        # Gemma3 takes one (images, tokens, D) tensor: per-image K may differ, so one row of all kept tokens
        return {"mm_encoder_outputs": {"image": BaseModelOutputWithPooling(pooler_output=torch.cat(pruned)[None])}}
