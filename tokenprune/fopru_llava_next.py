"""FoPru for LLaVA-NeXT (``LlavaNextForConditionalGeneration``, any-res), transformers 5.x.

LLaVA-NeXT encodes every image as ``1 + n`` square crops of the vision tower's input size:
the *base* view (the whole image resized) and ``n = nph * npw`` high-resolution crops
(``nph x npw`` chosen from ``config.image_grid_pinpoints``).  Its ``pack_image_features``
then builds, per image, the token sequence the LLM sees::

    [base patches (side*side, raster)]
    + for each row r of the big grid (crops tiled nph x npw, each side x side patches,
      then unpadded to the image's aspect ratio):  [row r patches ..., image_newline]

Two layers here:

* Pure layout/selection functions (tensors in, tensors out; the only transformers import is
  the model's own pure helpers ``get_anyres_image_grid_shape`` / ``unpad_image`` /
  ``image_size_to_num_patches`` so the layout is the model's by construction):
  :func:`anyres_layout` maps every packed token to the crop patch it came from (or marks it a
  newline); :func:`anyres_select` ranks a packed image's visual tokens with their per-crop
  FoPru scores and returns the packed positions to keep.
* :func:`fopru_generate_llava_next` — the generate plumbing; :func:`tokenprune.fopru_hf.
  fopru_generate` and :class:`tokenprune.FoPru` dispatch to it when
  ``model.config.model_type == "llava_next"``, so the public API is the same as for LLaVA.

Selection policy (reconstruction; the FoPru paper covers fixed-size LLaVA-1.5 only):

* ``keep`` applies to the **visual** tokens of each image (base + unpadded crop patches);
  ``K = round(keep * N_visual)`` or an int count, exact K.  Newline tokens are not counted in K.
* ``strategy="rank"``: base and crop patches are ranked together (global view over the whole
  packed image).  Each crop's CLS-attention scores are first normalised (``anyres_norm``):
  ``"sum"`` (default: each crop's patch scores sum to 1, so every view, base included, has
  the same total mass whatever its CLS self-attention), ``"max"`` (divide by the crop's
  maximum), ``"none"`` (raw scores; CLS attention is already a distribution per crop).
  Normalisation uses all the crop's patches, including those later removed by unpadding.
  ``strategy="row"`` is not offered for any-res (base and big grid have different widths).
* ``newline``: ``"row"`` (default) keeps a row's newline token iff at least one visual token
  of that big-grid row is kept; ``"all"`` always keeps all of them; ``"none"`` drops them.
* Kept tokens stay in packed order (the reorder step).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .fopru import fopru_scores, fopru_select, keep_to_count

__all__ = [
    "ANYRES_NORMS",
    "NEWLINE_RULES",
    "AnyResLayout",
    "AnyResStats",
    "anyres_layout",
    "anyres_select",
    "fopru_generate_llava_next",
    "is_llava_next",
]

ANYRES_NORMS = ("sum", "max", "none")
NEWLINE_RULES = ("row", "all", "none")


def _llava_next_helpers():
    from transformers.models.llava_next import modeling_llava_next as m

    return m.get_anyres_image_grid_shape, m.unpad_image, m.image_size_to_num_patches


def is_llava_next(model: nn.Module) -> bool:
    """True for a LLaVA-NeXT model (``config.model_type == "llava_next"``)."""
    return getattr(getattr(model, "config", None), "model_type", None) == "llava_next"


# --------------------------------------------------------------------------- pure layout
@dataclass(frozen=True)
class AnyResLayout:
    """Where every token of one packed LLaVA-NeXT image comes from.

    Attributes:
        source: ``(L,)`` int64; for a visual token, its index into the image's crop patches
            flattened as ``(1 + n_crops) * P`` (crop 0 = base view, patch raster order inside a
            crop, ``P = side * side``); ``-1`` for an ``image_newline`` token.
        row: ``(L,)`` int64 row id: ``0 .. side-1`` for the base view's rows,
            ``side + r`` for row ``r`` of the unpadded big grid (its newline included).
        n_crops: high-resolution crops (excluding the base view).
        grid: ``(nph, npw)`` crop grid; ``side``: patches per crop side;
        unpadded: ``(H', W')`` big-grid patch shape after unpadding.
    """

    source: torch.Tensor
    row: torch.Tensor
    n_crops: int
    grid: tuple[int, int]
    side: int
    unpadded: tuple[int, int]

    @property
    def is_newline(self) -> torch.Tensor:
        return self.source < 0

    @property
    def n_visual(self) -> int:
        return int((self.source >= 0).sum())

    def __len__(self) -> int:
        return int(self.source.numel())


def _size_list(image_size) -> list[int]:
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
        :class:`AnyResLayout` (length ``L`` = the image's placeholder count).
    Uses the model's own ``get_anyres_image_grid_shape`` and ``unpad_image`` on an index
    tensor, so the ordering and unpadding are the model's.
    """
    grid_shape, unpad, num_patches = _llava_next_helpers()
    size = _size_list(image_size)
    if not isinstance(grid_pinpoints, list) or not grid_pinpoints:
        raise ValueError("grid_pinpoints must be a non-empty list of (height, width) pairs")
    crop_size, patch_size = int(crop_size), int(patch_size)
    if crop_size < 1 or patch_size < 1 or crop_size % patch_size:
        raise ValueError(f"crop_size {crop_size} must be a positive multiple of patch_size {patch_size}")
    side = crop_size // patch_size
    p = side * side
    nph, npw = (int(v) for v in grid_shape(size, grid_pinpoints, crop_size))
    n = nph * npw
    if num_patches(size, grid_pinpoints, crop_size) != n + 1:
        raise ValueError(
            f"grid_pinpoints {grid_pinpoints} are not multiples of crop_size {crop_size}: "
            "the crop count does not match the crop grid"
        )
    idx = torch.arange(p, (n + 1) * p, dtype=torch.long).view(nph, npw, side, side)
    big = idx.permute(0, 2, 1, 3).reshape(nph * side, npw * side)  # rows of crops, then patch rows
    big = unpad(big[None], size)[0]
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


def _normalise(crop_scores: torch.Tensor, how: str) -> torch.Tensor:
    if how == "none":
        return crop_scores
    if how == "sum":
        den = crop_scores.sum(dim=1, keepdim=True)
    else:
        den = crop_scores.amax(dim=1, keepdim=True)
    return crop_scores / den.clamp_min(torch.finfo(crop_scores.dtype).tiny)


def anyres_select(
    crop_scores: torch.Tensor,
    layout: AnyResLayout,
    keep,
    *,
    anyres_norm: str = "sum",
    newline: str = "row",
) -> torch.Tensor:
    """Packed positions to keep for one image (FoPru ``rank`` over base + crops).

    Args:
        crop_scores: ``(1 + n_crops, P)`` FoPru patch scores per crop (row 0 = base view),
            e.g. :func:`tokenprune.fopru_scores` of the captured CLS rows.
        layout: :func:`anyres_layout` of the image.
        keep: fraction in (0, 1] of the image's visual tokens or an int count (exact K;
            newline tokens are not counted).
        anyres_norm: per-crop normalisation, ``"sum"`` | ``"max"`` | ``"none"`` (module doc).
        newline: ``"row"`` | ``"all"`` | ``"none"`` (module doc).

    Returns:
        ``(K + kept newlines,)`` int64 positions in ``[0, L)``, ascending (packed order).
    """
    if anyres_norm not in ANYRES_NORMS:
        raise ValueError(f"unknown anyres_norm {anyres_norm!r}; expected one of {ANYRES_NORMS}")
    if newline not in NEWLINE_RULES:
        raise ValueError(f"unknown newline rule {newline!r}; expected one of {NEWLINE_RULES}")
    p = layout.side * layout.side
    if not isinstance(crop_scores, torch.Tensor) or crop_scores.shape != (layout.n_crops + 1, p):
        shape = tuple(crop_scores.shape) if isinstance(crop_scores, torch.Tensor) else type(crop_scores).__name__
        raise ValueError(f"crop_scores must be ({layout.n_crops + 1}, {p}) for this layout, got {shape}")
    if not crop_scores.is_floating_point():
        raise TypeError(f"crop_scores must be floating point, got {crop_scores.dtype}")
    if not torch.isfinite(crop_scores).all():
        raise ValueError("crop_scores contains NaN or inf")
    src = layout.source.to(crop_scores.device)
    vis_pos = (src >= 0).nonzero().squeeze(1)  # packed positions of visual tokens, ascending
    flat = _normalise(crop_scores.float(), anyres_norm).reshape(-1)
    vis_scores = flat[src[vis_pos]]
    k = keep_to_count(int(vis_pos.numel()), keep)
    sel = fopru_select(vis_scores[None], k, strategy="rank")[0]
    keep_mask = torch.zeros(src.numel(), dtype=torch.bool, device=src.device)
    keep_mask[vis_pos[sel]] = True
    nl = src < 0
    if newline == "all":
        keep_mask |= nl
    elif newline == "row":
        row = layout.row.to(src.device)
        rows_hit = torch.zeros(int(row.max()) + 1, dtype=torch.bool, device=src.device)
        rows_hit[row[keep_mask]] = True
        keep_mask |= nl & rows_hit[row]
    return keep_mask.nonzero().squeeze(1)


# --------------------------------------------------------------------------- stats
@dataclass
class AnyResStats:
    """Counters of one pruned LLaVA-NeXT generate call (per image, packed tokens).

    ``tokens_in``/``tokens_out`` count all placeholder tokens (visual + newline);
    ``visual_in``/``visual_out`` and ``newline_in``/``newline_out`` split them;
    ``kept_indices`` are the kept packed positions per image.
    """

    tokens_in: list[int] = field(default_factory=list)
    tokens_out: list[int] = field(default_factory=list)
    prompt_tokens_in: list[int] = field(default_factory=list)
    prompt_tokens_out: list[int] = field(default_factory=list)
    kept_indices: list[torch.Tensor] = field(default_factory=list)
    visual_in: list[int] = field(default_factory=list)
    visual_out: list[int] = field(default_factory=list)
    newline_in: list[int] = field(default_factory=list)
    newline_out: list[int] = field(default_factory=list)

    @property
    def prefill_tokens_saved(self) -> int:
        return int(sum(self.tokens_in) - sum(self.tokens_out))

    def as_dict(self) -> dict:
        d = {
            k: list(getattr(self, k))
            for k in (
                "tokens_in",
                "tokens_out",
                "prompt_tokens_in",
                "prompt_tokens_out",
                "visual_in",
                "visual_out",
                "newline_in",
                "newline_out",
            )
        }
        d["prefill_tokens_saved"] = self.prefill_tokens_saved
        return d


# --------------------------------------------------------------------------- generate
def encode_and_score_llava_next(
    model: nn.Module,
    pixel_values: torch.Tensor,
    image_sizes: torch.Tensor,
    *,
    layer: int = -2,
    method: str = "cls",
    capture=None,
    **feature_kwargs,
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[AnyResLayout]]:
    """Encode with the model's own ``get_image_features`` under attention capture.

    Returns ``(features, crop_scores, layouts)`` per image: packed features ``(L_i, D)``,
    FoPru scores ``(1 + n_crops_i, P)`` and the :class:`AnyResLayout` (checked against L_i).
    """
    from .fopru_hf import AttentionRowCapture, _vision_tower

    cfg = model.config
    if not isinstance(cfg.vision_feature_layer, int):
        raise ValueError("FoPru supports a single vision_feature_layer (int), not a list")
    own = capture is None
    if own:
        capture = AttentionRowCapture.for_model(model, layer=layer, method=method)
    try:
        capture.attach()
        capture.rows = None
        with torch.no_grad():
            out = model.get_image_features(
                pixel_values=pixel_values, image_sizes=image_sizes, return_dict=True, **feature_kwargs
            )
        rows = capture.rows
    finally:
        if own:
            capture.remove()
    if rows is None:
        raise RuntimeError("FoPru capture hooks did not fire: the chosen vision layer was not run")
    has_cls = getattr(getattr(_vision_tower(model), "embeddings", None), "class_embedding", None) is not None
    if method == "cls" and not has_cls:
        raise ValueError("method='cls' needs a CLS token; this vision tower has none: use method='colmean'")
    scores = fopru_scores(rows, method=method, num_prefix=1 if has_cls else 0)  # (total crops, P)
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
    return feats, list(scores.split(counts, dim=0)), layouts


def fopru_generate_llava_next(
    model: nn.Module,
    processor_outputs: Any,
    *,
    keep=0.25,
    strategy: str = "rank",
    layer: int | None = -2,
    method: str = "cls",
    row_mode: str = "rows",
    grid: tuple[int, int] | None = None,
    feature_passing: str = "auto",
    restore_prompt: bool = True,
    kept_indices: Sequence[torch.Tensor] | None = None,
    anyres_norm: str = "sum",
    newline: str = "row",
    _generate: Callable | None = None,
    _capture=None,
    **generate_kwargs,
):
    """:func:`tokenprune.fopru_hf.fopru_generate` for ``LlavaNextForConditionalGeneration``.

    ``processor_outputs`` needs ``input_ids``, ``pixel_values`` (``(B, crops, 3, S, S)`` or
    ``(total crops, 3, S, S)``) and ``image_sizes`` ``(n_images, 2)``.  ``keep`` (one value
    or one per image) applies to visual tokens; ``anyres_norm`` and ``newline`` are described in
    the module doc; ``strategy`` must be ``"rank"`` (``row_mode``/``grid`` are not used).
    ``kept_indices`` bypasses scoring with per-image *packed* positions (newlines included as
    the caller chooses).  Returns ``(sequences, AnyResStats)``.
    """
    from .fopru_hf import (
        _get,
        _per_image_keep,
        generate_with_features,
        pad_token_id,
        prune_mm_inputs,
        restore_original_prompt,
    )

    if feature_passing not in ("auto", "mm_encoder_outputs", "inputs_embeds"):
        raise ValueError(f"unknown feature_passing {feature_passing!r}")
    if strategy != "rank":
        raise ValueError(
            f"strategy={strategy!r} is not supported for LLaVA-NeXT any-res (base view and big grid "
            "have different row widths); use strategy='rank'"
        )
    if anyres_norm not in ANYRES_NORMS:
        raise ValueError(f"unknown anyres_norm {anyres_norm!r}; expected one of {ANYRES_NORMS}")
    if newline not in NEWLINE_RULES:
        raise ValueError(f"unknown newline rule {newline!r}; expected one of {NEWLINE_RULES}")
    gen = _generate if _generate is not None else model.generate
    input_ids = _get(processor_outputs, "input_ids")
    pixel_values = _get(processor_outputs, "pixel_values")
    attention_mask = _get(processor_outputs, "attention_mask")
    image_sizes = _get(processor_outputs, "image_sizes")
    if input_ids is None or pixel_values is None:
        raise ValueError("processor_outputs needs input_ids and pixel_values")
    if image_sizes is None:
        raise ValueError("LLaVA-NeXT needs image_sizes (n_images, 2) in processor_outputs")
    image_sizes = torch.as_tensor(image_sizes)
    if image_sizes.dim() != 2 or image_sizes.shape[1] != 2:
        raise ValueError(f"image_sizes must be (n_images, 2), got {tuple(image_sizes.shape)}")
    extra = {
        k: v
        for k, v in (processor_outputs.items() if hasattr(processor_outputs, "items") else [])
        if k not in ("input_ids", "pixel_values", "attention_mask", "image_sizes")
    }
    feat_kwargs = {
        k: generate_kwargs.pop(k)
        for k in ("vision_feature_layer", "vision_feature_select_strategy")
        if k in generate_kwargs
    }
    if layer is None:
        layer = model.config.vision_feature_layer

    feats, crop_scores, layouts = encode_and_score_llava_next(
        model, pixel_values, image_sizes, layer=layer, method=method, capture=_capture, **feat_kwargs
    )
    n_images = len(feats)
    if kept_indices is None:
        keeps = _per_image_keep(keep, n_images)
        kept = [
            anyres_select(s, lay, kp, anyres_norm=anyres_norm, newline=newline)
            for s, lay, kp in zip(crop_scores, layouts, keeps)
        ]
    else:
        if len(kept_indices) != n_images:
            raise ValueError(f"kept_indices has {len(kept_indices)} entries for {n_images} images")
        kept = []
        for k, lay in zip(kept_indices, layouts):
            k = torch.as_tensor(k, dtype=torch.long).unique()  # sorted, no duplicates
            if k.numel() == 0 or int(k.min()) < 0 or int(k.max()) >= len(lay):
                raise ValueError(f"kept_indices must be non-empty packed positions within [0, {len(lay)})")
            kept.append(k)
    dev = feats[0].device
    pruned = [f[k.to(dev)] for f, k in zip(feats, kept)]

    image_token_id = model.config.image_token_id
    new_ids, new_mask = prune_mm_inputs(
        input_ids,
        attention_mask,
        image_token_id,
        [f.shape[0] for f in feats],
        kept,
        pad_token_id=pad_token_id(model),
    )
    base_mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
    nl_kept = [int(lay.is_newline[k].sum()) for lay, k in zip(layouts, kept)]
    stats = AnyResStats(
        tokens_in=[f.shape[0] for f in feats],
        tokens_out=[f.shape[0] for f in pruned],
        prompt_tokens_in=base_mask.sum(1).tolist(),
        prompt_tokens_out=new_mask.sum(1).tolist(),
        kept_indices=[k.cpu() for k in kept],
        visual_in=[lay.n_visual for lay in layouts],
        visual_out=[int(k.numel()) - n for k, n in zip(kept, nl_kept)],
        newline_in=[len(lay) - lay.n_visual for lay in layouts],
        newline_out=nl_kept,
    )

    out = generate_with_features(
        model,
        gen,
        new_ids,
        pruned,
        feature_passing=feature_passing,
        attention_mask=new_mask,
        **extra,
        **generate_kwargs,
    )
    if restore_prompt:
        out = restore_original_prompt(out, input_ids, new_ids)
    return out, stats
