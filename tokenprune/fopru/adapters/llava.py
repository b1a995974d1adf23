"""FoPru for ``LlavaForConditionalGeneration``: fixed-size images, CLIP or SigLIP tower.

Scores come from the CLS row (``method="cls"``: CLIP, the default when the tower has a CLS
token) or the column means (``"colmean"``: any tower, the default for SigLIP) of the vision
layer feeding ``hidden_states[layer]`` (``None`` = the model's ``vision_feature_layer``);
``keep`` counts patch tokens; a CLS feature (strategy ``"full"``) is always kept;
``strategy="row"`` uses the square patch grid unless ``grid=`` is given.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from tokenprune.fopru.capture import AttentionRowCapture, vision_tower
from tokenprune.fopru.core import fopru_scores, select_per_image

from .base import Encoded, FoPruAdapter
from .registry import register

FEATURE_KEYS = ("vision_feature_layer", "vision_feature_select_strategy")


def has_cls_token(model) -> bool:
    """True when the model's vision tower embeds a CLS token (CLIP), False for SigLIP."""
    return getattr(getattr(vision_tower(model), "embeddings", None), "class_embedding", None) is not None


def square_grid(n: int) -> tuple[int, int] | None:
    side = math.isqrt(n)
    return (side, side) if side * side == n else None


@register("llava")
class LlavaAdapter(FoPruAdapter):
    """LLaVA-1.5-style models: one fixed-size crop per image, separate q/k projections."""

    family = "LLaVA"
    input_keys = ("pixel_values", "image_sizes", *FEATURE_KEYS)

    def default_method(self) -> str:
        return "cls" if has_cls_token(self.model) else "colmean"

    def check_options(self) -> None:
        if not isinstance(self.model.config.vision_feature_layer, int):
            raise ValueError("FoPru supports a single vision_feature_layer (int), not a list")
        self.has_cls = has_cls_token(self.model)
        if self.method == "cls" and not self.has_cls:
            raise ValueError("method='cls' needs a CLS token; this vision tower has none: use method='colmean'")

    def scoring_layer(self) -> int:
        return self.layer if self.layer is not None else self.model.config.vision_feature_layer

    def make_capture(self) -> AttentionRowCapture:
        return AttentionRowCapture.for_model(self.model, layer=self.scoring_layer(), method=self.method)

    def rows(self) -> torch.Tensor:
        if self.capture.rows is None:
            raise RuntimeError("FoPru capture hooks did not fire: the chosen vision layer was not run")
        return self.capture.rows

    def encode(self, mm: dict[str, Any]) -> Encoded:
        if mm.get("image_sizes") is not None:
            raise ValueError(
                f"FoPru: image_sizes (any-res / variable-size images) is not supported for "
                f"{type(self.model).__name__}; any-res packing is the LLaVA-NeXT family's"
            )
        feature_kwargs = {k: mm[k] for k in FEATURE_KEYS if mm.get(k) is not None}
        out = self.model.get_image_features(pixel_values=mm["pixel_values"], return_dict=True, **feature_kwargs)
        scores = fopru_scores(self.rows(), method=self.method, num_prefix=int(self.has_cls), check_finite=False)
        feats = out.pooler_output
        feats = list(feats.unbind(0)) if isinstance(feats, torch.Tensor) else list(feats)
        n_feat = feats[0].shape[0]
        n_prefix = n_feat - scores.shape[1]
        if any(f.shape[0] != n_feat for f in feats) or n_prefix not in (0, 1):
            raise ValueError(
                f"FoPru: features ({[f.shape[0] for f in feats]} tokens) do not line up with the "
                f"{scores.shape[1]} patch tokens; variable-size images need an any-res family (LLaVA-NeXT)"
            )
        return Encoded(feats, scores, {"n_prefix": n_prefix})

    def with_prefix(self, kept: list[torch.Tensor], n_prefix: int) -> list[torch.Tensor]:
        """Patch indices -> run positions (a CLS feature at position 0 is always kept)."""
        if not n_prefix:
            return kept
        head = torch.arange(n_prefix, device=kept[0].device)
        return [torch.cat([head, k + n_prefix]) for k in kept]

    def select(self, enc: Encoded, keeps: list) -> list[torch.Tensor]:
        n_patch = enc.scores.shape[1]
        grid = self.grid if self.grid is not None else square_grid(n_patch)
        if self.strategy == "row" and grid is None:
            raise ValueError(f"strategy='row' needs grid=(H, W): {n_patch} patches is not a square")
        kept = select_per_image(enc.scores, keeps, strategy=self.strategy, grid=grid, row_mode=self.row_mode)
        return self.with_prefix(kept, enc.info["n_prefix"])

    def kept_from_indices(self, enc: Encoded, kept_indices) -> list[torch.Tensor]:
        n_patch = enc.scores.shape[1]
        kept = [torch.as_tensor(k, dtype=torch.long).sort().values for k in kept_indices]
        for k in kept:
            if k.numel() == 0 or int(k.min()) < 0 or int(k.max()) >= n_patch:
                raise ValueError(f"kept_indices must be non-empty and within [0, {n_patch})")
        return self.with_prefix(kept, enc.info["n_prefix"])

    def stats_extras(self, enc: Encoded, kept: list[torch.Tensor]) -> dict[str, Any]:
        n_prefix = enc.info["n_prefix"]
        return {"kept_indices": [k[n_prefix:] - n_prefix for k in kept]} if n_prefix else {}
