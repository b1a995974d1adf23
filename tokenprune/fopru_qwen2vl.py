"""FoPru for Qwen2-VL (``Qwen2VLForConditionalGeneration``, transformers 5.x), no fork, no patching.

Qwen2-VL differs from LLaVA in every place FoPru touches, so it has its own adapter; the public
entry points (:func:`tokenprune.fopru_hf.fopru_generate`, :class:`tokenprune.fopru_hf.FoPru`)
dispatch here on ``config.model_type == "qwen2_vl"``.

* **Vision attention.** Each vision block's ``attn`` has a fused ``qkv`` linear, 2-D (h, w)
  rotary embeddings and no CLS token; all images of a call run as ONE packed sequence whose
  attention is block-diagonal per image (``cu_seqlens``).  :class:`Qwen2VLAttentionCapture`
  puts a forward pre-hook on ``attn`` (to read ``cu_seqlens`` and the rotary ``cos``/``sin``)
  and a forward hook on ``attn.qkv`` (its output), applies the rotary exactly as the model does
  and recomputes, per image and in blocks of queries, the column means of
  ``softmax(q k^T * scale)`` (only ``method="colmean"``: attention received).
* **Merged tokens.** The processor orders each image's patches so that every 2x2 merge window is
  contiguous (block-major); the merger concatenates 4 consecutive patches into one LLM token,
  emitted in raster order over the merged grid ``(h/2, w/2)``.  :func:`packed_patch_to_raster`
  maps packed patch positions to raster positions; patch scores are mapped to raster order and
  pooled with :func:`tokenprune.fopru.merge_grid_scores`, then :func:`tokenprune.fopru_select`
  runs per image over its merged grid (grids differ per image).
* **Positions.** The LLM uses 3-D M-RoPE ``(t, h, w)`` position ids.  They are computed with the
  model's own ``get_rope_index`` on the UNPRUNED prompt, and the columns of the kept tokens are
  gathered: every surviving image token keeps its original ``(t, h, w)`` and every text token
  keeps its original position (pruning moves nothing).  ``generate`` receives them as
  ``position_ids`` of shape ``(4, B, L')`` (row 0 = plain text positions of the shrunk prompt,
  used by transformers only for mask construction, rows 1-3 = M-RoPE), which is the layout
  ``Qwen2VLForConditionalGeneration._prepare_position_ids_for_generation`` produces itself; its
  decode steps continue every row with ``last + 1``, exactly as for an unpruned prompt.
  ``model.model.rope_deltas`` is set to the deltas of the pruned layout
  (``max position + 1 - attended tokens`` per row, the model's own convention), so a forward
  without ``position_ids`` on the cache also continues correctly.

Not supported (clear errors): videos, images with ``t > 1``, Qwen2.5-VL (window attention with
a patch permutation), ``method="cls"`` (no CLS token), a user-supplied ``position_ids`` or
``grid`` (both are derived per image here).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .fopru import fopru_select, merge_grid_scores
from .fopru_hf import (
    FoPruStats,
    _get,
    _is_qwen2vl,
    _per_image_keep,
    generate_with_features,
    pad_token_id,
    restore_original_prompt,
)

__all__ = [
    "Qwen2VLAttentionCapture",
    "compact_tokens",
    "fopru_generate_qwen2vl",
    "is_qwen2vl",
    "merged_scores_from_packed",
    "packed_patch_to_raster",
]

is_qwen2vl = _is_qwen2vl  # ``config.model_type == "qwen2_vl"`` (the dispatch test of fopru_hf)


# --------------------------------------------------------------------------- pure helpers
def packed_patch_to_raster(grid: tuple[int, int], merge: int = 2, device=None) -> torch.Tensor:
    """Raster index of every packed (block-major) patch of one image frame.

    Qwen2-VL's processor emits the ``h x w`` patches of a frame window by window: merged token
    ``m = (bh, bw)`` (raster over ``(h/merge, w/merge)``) owns the ``merge**2`` consecutive
    patches ``m*merge**2 + (dy*merge + dx)`` at patch row ``bh*merge + dy``, column
    ``bw*merge + dx`` (the layout of ``transformers.vision_utils.get_vision_position_ids``).

    Returns:
        ``(h*w,)`` int64: ``out[j]`` = raster index ``row * w + col`` of packed patch ``j``.
    """
    h, w = (int(g) for g in grid)
    if h < 1 or w < 1 or h % merge or w % merge:
        raise ValueError(f"patch grid {(h, w)} is not divisible by the merge size {merge}")
    rows = torch.arange(h, device=device)[:, None].expand(h, w)
    cols = torch.arange(w, device=device)[None, :].expand(h, w)
    raster = rows * w + cols  # (h, w)
    return raster.reshape(h // merge, merge, w // merge, merge).transpose(1, 2).reshape(-1)


def merged_scores_from_packed(scores: torch.Tensor, grid: tuple[int, int], merge: int = 2) -> torch.Tensor:
    """Pool one frame's packed patch scores onto its merged-token grid.

    Args:
        scores: ``(..., h*w)`` patch scores in the packed (block-major) order of the vision tower.
        grid: ``(h, w)`` patch grid of the frame (``image_grid_thw[i, 1:]``).
        merge: ``spatial_merge_size``.

    Returns:
        ``(..., (h/merge) * (w/merge))`` mean score of each merged token, in the order the
        merger emits them (raster over the merged grid).
    """
    h, w = (int(g) for g in grid)
    if scores.shape[-1] != h * w:
        raise ValueError(f"scores have {scores.shape[-1]} patches but the grid {(h, w)} has {h * w}")
    lead = scores.shape[:-1]
    flat = scores.reshape(-1, h * w)
    raster = torch.empty_like(flat)
    raster[:, packed_patch_to_raster((h, w), merge, device=scores.device)] = flat
    return merge_grid_scores(raster, (h, w), merge).reshape(*lead, -1)


def compact_tokens(
    keep: torch.Tensor,
    attention_mask: torch.Tensor,
    tensors: Sequence[tuple[torch.Tensor, int]],
    *,
    padding_side: str | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Drop the columns ``~keep`` of every row and re-pad rows to the longest one.

    Args:
        keep: ``(B, L)`` bool, columns to keep.
        attention_mask: ``(B, L)``.
        tensors: ``(x, pad_value)`` pairs, ``x`` of shape ``(..., B, L)`` (e.g. ``(3, B, L)``
            M-RoPE position ids) compacted the same way.
        padding_side: ``"left"``/``"right"``; None = right only if some row ends masked.

    Returns:
        ``(new_attention_mask (B, L'), [new x (..., B, L') per input])``.
    """
    b, L = keep.shape
    if padding_side is None:
        padding_side = "right" if bool((attention_mask[:, -1] == 0).any()) else "left"
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    lengths = keep.sum(1)
    new_len = int(lengths.max())
    col = keep.long().cumsum(1) - 1
    if padding_side == "left":
        col = col + (new_len - lengths)[:, None]
    rows = torch.arange(b, device=keep.device)[:, None].expand(b, L)
    r, c = rows[keep], col[keep]
    new_mask = torch.zeros((b, new_len), dtype=attention_mask.dtype, device=attention_mask.device)
    new_mask[r, c] = attention_mask[keep]
    outs = []
    for x, pad in tensors:
        y = torch.full((*x.shape[:-2], b, new_len), pad, dtype=x.dtype, device=x.device)
        y[..., r, c] = x[..., keep]
        outs.append(y)
    return new_mask, outs


# --------------------------------------------------------------------------- attention capture
def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Qwen2VLAttentionCapture:
    """Hooks on one Qwen2-VL vision ``attn`` that recompute FoPru ``colmean`` rows per image.

    After each forward of the vision tower, :attr:`rows` is ``(heads, N_total)`` float32: for a
    packed patch ``j`` of image (segment) ``s``, ``mean_{i in s} A_s[h, i, j]`` where
    ``A_s = softmax(q_s k_s^T * scale)`` is the eager attention of that image (the attention is
    block-diagonal per ``cu_seqlens`` segment), with the 2-D rotary applied exactly as
    ``apply_rotary_pos_emb_vision`` does.  :attr:`cu_seqlens` holds the segment boundaries.
    Queries are processed in blocks of at most ``max_block_elems / (heads * n_s)`` rows, so
    memory stays bounded for big images (no full ``n x n`` per head at once).
    """

    def __init__(self, attn_module: nn.Module, *, method: str = "colmean", max_block_elems: int = 1 << 24):
        if method == "cls":
            raise ValueError("method='cls' needs a CLS token; the Qwen2-VL vision tower has none: use method='colmean'")
        if method != "colmean":
            raise ValueError(f"unknown method {method!r}; Qwen2-VL supports only 'colmean'")
        if not isinstance(getattr(attn_module, "qkv", None), nn.Linear):
            raise TypeError(f"{type(attn_module).__name__} has no fused qkv linear: not a Qwen2-VL vision attention")
        self.module = attn_module
        self.method = method
        self.num_heads = int(attn_module.num_heads)
        self.scale = float(getattr(attn_module, "scaling", None) or (attn_module.head_dim**-0.5))
        self.max_block_elems = int(max_block_elems)
        self._ctx: tuple | None = None
        self._handles: list = []
        self.rows: torch.Tensor | None = None
        self.cu_seqlens: torch.Tensor | None = None

    # hooks -----------------------------------------------------------------
    def _on_attn_pre(self, _mod, args, kwargs):
        cu = kwargs.get("cu_seqlens", args[1] if len(args) > 1 else None)
        pe = kwargs.get("position_embeddings", args[2] if len(args) > 2 else None)
        if cu is None or pe is None:
            raise RuntimeError("FoPru capture: Qwen2-VL vision attention called without cu_seqlens/position_embeddings")
        self._ctx = (cu, pe)

    def _on_qkv(self, _mod, _inp, out):
        if self._ctx is None:
            raise RuntimeError("FoPru capture: qkv ran outside its attention module; unsupported layout")
        cu, (cos, sin) = self._ctx
        self._ctx = None
        self.rows = self.compute_rows(out.detach(), cos.detach(), sin.detach(), cu)
        self.cu_seqlens = cu.detach().to(torch.long).cpu()

    def compute_rows(
        self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cu_seqlens: torch.Tensor
    ) -> torch.Tensor:
        """qkv: ``(N, 3*heads*d)``; cos, sin: ``(N, d)``; cu_seqlens: ``(S+1,)`` -> ``(heads, N)``."""
        n = qkv.shape[0]
        q, k, _ = qkv.reshape(n, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)  # (N, heads, d)
        dtype = q.dtype
        c, s = cos.unsqueeze(-2).float(), sin.unsqueeze(-2).float()
        # same arithmetic (and cast back to the activation dtype) as apply_rotary_pos_emb_vision
        q = (q.float() * c + _rotate_half(q.float()) * s).to(dtype).float().transpose(0, 1)  # (heads, N, d)
        k = (k.float() * c + _rotate_half(k.float()) * s).to(dtype).float().transpose(0, 1)
        out = torch.zeros(self.num_heads, n, dtype=torch.float32, device=qkv.device)
        bounds = cu_seqlens.tolist()
        for a, b in zip(bounds[:-1], bounds[1:]):  # one image (frame) at a time: block-diagonal
            seg = b - a
            if seg == 0:
                continue
            kt = k[:, a:b].transpose(-1, -2)
            blk = max(1, self.max_block_elems // (self.num_heads * seg))
            acc = out[:, a:b]
            for start in range(a, b, blk):
                p = torch.softmax(q[:, start : min(b, start + blk)] @ kt * self.scale, dim=-1)
                acc += p.sum(dim=1)
            acc /= seg
        return out

    # lifecycle -------------------------------------------------------------
    def attach(self) -> Qwen2VLAttentionCapture:
        if not self._handles:
            self._handles = [
                self.module.register_forward_pre_hook(self._on_attn_pre, with_kwargs=True),
                self.module.qkv.register_forward_hook(self._on_qkv),
            ]
        return self

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._ctx = None

    def __enter__(self):
        return self.attach()

    def __exit__(self, *exc):
        self.remove()
        return False

    def image_scores(self) -> list[torch.Tensor]:
        """Head-mean colmean score of every patch, one ``(n_s,)`` tensor per segment (image)."""
        if self.rows is None:
            raise RuntimeError("FoPru capture hooks did not fire: the chosen vision block was not run")
        s = self.rows.mean(0)
        return list(torch.split(s, torch.diff(self.cu_seqlens).tolist()))

    @classmethod
    def for_model(cls, model: nn.Module, *, layer: int | None = -1, method: str = "colmean") -> Qwen2VLAttentionCapture:
        """Capture on the attention of vision block ``layer`` (``hidden_states`` indexing:
        ``-1`` = the last block, whose output the merger projects; ``None`` = the same)."""
        blocks = _visual(model).blocks
        n = len(blocks)
        if layer is None:
            layer = -1
        idx = layer + n + 1 if layer < 0 else layer
        if not 1 <= idx <= n:
            raise ValueError(f"layer={layer} is out of range for a vision tower with {n} blocks")
        return cls(blocks[idx - 1].attn, method=method)


def _visual(model: nn.Module) -> nn.Module:
    for path in ("model.visual", "visual"):
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if obj is not None and hasattr(obj, "blocks") and hasattr(obj, "merger"):
            return obj
    raise TypeError(f"{type(model).__name__}: no Qwen2-VL vision tower (model.visual with blocks/merger)")


def _inner(model: nn.Module) -> nn.Module:
    """The ``Qwen2VLModel`` (holder of ``get_rope_index`` / ``rope_deltas``)."""
    inner = getattr(model, "model", model)
    if not hasattr(inner, "get_rope_index"):
        raise TypeError(f"{type(model).__name__}: no get_rope_index (not a Qwen2-VL model)")
    return inner


# --------------------------------------------------------------------------- generate
def fopru_generate_qwen2vl(
    model: nn.Module,
    processor_outputs: Any,
    *,
    keep=0.25,
    strategy: str = "rank",
    layer: int | None = -2,
    method: str = "colmean",
    row_mode: str = "rows",
    grid: tuple[int, int] | None = None,
    feature_passing: str = "auto",
    restore_prompt: bool = True,
    kept_indices: Sequence[torch.Tensor] | None = None,
    _generate: Callable | None = None,
    _capture: Qwen2VLAttentionCapture | None = None,
    **generate_kwargs,
):
    """FoPru-pruned ``generate`` for ``Qwen2VLForConditionalGeneration``.

    Args:
        model: a ``Qwen2VLForConditionalGeneration``.
        processor_outputs: mapping with ``input_ids`` ``(B, L)``, ``pixel_values``
            ``(sum_i h_i*w_i, C*T*p*p)`` (packed patches, as the processor returns them),
            ``image_grid_thw`` ``(n_images, 3)``, optional ``attention_mask`` and
            ``mm_token_type_ids`` (rebuilt from the image/video token ids when absent).
            ``image_grid_thw``/``mm_token_type_ids`` may also come as keyword arguments.
        keep: per merged token: fraction in (0, 1], int count, or a list of those per image.
        strategy, row_mode: see :func:`tokenprune.fopru_select`; ``"row"`` works on each
            image's merged grid ``(h/2, w/2)``.
        layer: vision block (``hidden_states`` indexing, ``-1`` = last block, which feeds the
            merger; ``None`` = ``-1``) whose attention scores the patches.
        method: only ``"colmean"`` (no CLS token).
        feature_passing, restore_prompt, kept_indices: as in
            :func:`tokenprune.fopru_hf.fopru_generate` (``kept_indices``: per image, indices
            into its merged tokens).
        **generate_kwargs: passed to ``model.generate``.

    Returns:
        ``(sequences_or_generate_output, FoPruStats)``; counts are merged (LLM) tokens.
    """
    if feature_passing not in ("auto", "mm_encoder_outputs", "inputs_embeds"):
        raise ValueError(f"unknown feature_passing {feature_passing!r}")
    if method == "cls":
        raise ValueError("method='cls' needs a CLS token; the Qwen2-VL vision tower has none: use method='colmean'")
    if grid is not None:
        raise ValueError("grid= is not used for Qwen2-VL: each image's merged grid comes from image_grid_thw")
    if generate_kwargs.get("position_ids") is not None:
        raise ValueError("position_ids cannot be passed: FoPru computes the M-RoPE positions of the pruned prompt")
    gen = _generate if _generate is not None else model.generate
    inner = _inner(model)
    cfg = model.config
    input_ids = _get(processor_outputs, "input_ids")
    pixel_values = _get(processor_outputs, "pixel_values")
    attention_mask = _get(processor_outputs, "attention_mask")
    extra = dict(processor_outputs.items()) if hasattr(processor_outputs, "items") else {}
    for k in ("input_ids", "pixel_values", "attention_mask"):
        extra.pop(k, None)
    for k in ("image_grid_thw", "mm_token_type_ids", "pixel_values_videos", "video_grid_thw"):
        if k in generate_kwargs:
            v = generate_kwargs.pop(k)
            if extra.get(k) is None:
                extra[k] = v
    grid_thw = extra.pop("image_grid_thw", None)
    mm_tt = extra.pop("mm_token_type_ids", None)
    extra.pop("position_ids", None)
    if extra.pop("pixel_values_videos", None) is not None or extra.pop("video_grid_thw", None) is not None:
        raise ValueError("FoPru for Qwen2-VL prunes images only; videos are not supported")
    if input_ids is None or pixel_values is None:
        raise ValueError("processor_outputs needs input_ids and pixel_values")
    if grid_thw is None:
        raise ValueError("Qwen2-VL needs image_grid_thw (returned by its processor)")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (B, L), got {tuple(input_ids.shape)}")
    grid_thw = torch.as_tensor(grid_thw)
    if grid_thw.dim() != 2 or grid_thw.shape[1] != 3:
        raise ValueError(f"image_grid_thw must be (n_images, 3), got {tuple(grid_thw.shape)}")
    merge = int(cfg.vision_config.spatial_merge_size)
    if bool((grid_thw[:, 0] != 1).any()):
        raise ValueError("FoPru for Qwen2-VL supports images with t=1 only (image_grid_thw[:, 0] == 1)")
    if bool(((grid_thw[:, 1:] % merge) != 0).any()):
        raise ValueError(f"image_grid_thw h/w must be divisible by spatial_merge_size={merge}")
    n_patches = grid_thw.prod(-1)
    if pixel_values.shape[0] != int(n_patches.sum()):
        raise ValueError(
            f"pixel_values has {pixel_values.shape[0]} patches but image_grid_thw describes {int(n_patches.sum())}"
        )
    image_token_id = int(cfg.image_token_id)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if mm_tt is None:
        mm_tt = torch.zeros_like(input_ids, dtype=torch.int)
        mm_tt[input_ids == image_token_id] = 1
        mm_tt[input_ids == int(getattr(cfg, "video_token_id", -1))] = 2
    n_merged = (n_patches // merge**2).tolist()
    n_images = len(n_merged)
    is_img = input_ids == image_token_id
    if int(is_img.sum()) != sum(n_merged):
        raise ValueError(f"input_ids hold {int(is_img.sum())} image tokens but image_grid_thw gives {sum(n_merged)}")

    # 1. encode once (model's own path) with the capture hooks, score, select
    own = _capture is None
    capture = _capture if _capture is not None else Qwen2VLAttentionCapture.for_model(model, layer=layer, method=method)
    try:
        capture.attach()
        capture.rows = None
        with torch.no_grad():
            out_feat = model.get_image_features(pixel_values=pixel_values, image_grid_thw=grid_thw, return_dict=True)
        patch_scores = capture.image_scores() if kept_indices is None else None
    finally:
        if own:
            capture.remove()
    feats = list(out_feat.pooler_output)
    if kept_indices is None:
        if len(patch_scores) != n_images:
            raise RuntimeError(f"captured {len(patch_scores)} attention segments for {n_images} images")
        keeps = _per_image_keep(keep, n_images)
        kept = []
        for i in range(n_images):  # per image: grids (and K) differ
            h, w = int(grid_thw[i, 1]), int(grid_thw[i, 2])
            s = merged_scores_from_packed(patch_scores[i], (h, w), merge)
            kept.append(
                fopru_select(s[None], keeps[i], strategy=strategy, grid=(h // merge, w // merge), row_mode=row_mode)[0]
            )
    else:
        if len(kept_indices) != n_images:
            raise ValueError(f"kept_indices has {len(kept_indices)} entries for {n_images} images")
        kept = [torch.as_tensor(k, dtype=torch.long).sort().values for k in kept_indices]
        for k, n in zip(kept, n_merged):
            if k.numel() == 0 or int(k.min()) < 0 or int(k.max()) >= n or k.unique().numel() != k.numel():
                raise ValueError(f"kept_indices must be non-empty, unique and within [0, {n})")
    dev = feats[0].device
    pruned = [f[k.to(dev)] for f, k in zip(feats, kept)]

    # 2. M-RoPE positions of the UNPRUNED prompt, then the kept columns
    with torch.no_grad():
        pos3, _ = inner.get_rope_index(
            input_ids, mm_token_type_ids=mm_tt, image_grid_thw=grid_thw, attention_mask=attention_mask
        )
    img_keep = torch.zeros(sum(n_merged), dtype=torch.bool, device=input_ids.device)
    offsets = torch.tensor([0] + n_merged[:-1]).cumsum(0).tolist()
    img_keep[torch.cat([k.to(input_ids.device) + o for k, o in zip(kept, offsets)])] = True
    keep_mask = torch.ones_like(is_img)
    keep_mask[is_img] = img_keep
    new_mask, (new_ids, new_tt, new_pos3) = compact_tokens(
        keep_mask, attention_mask, [(input_ids, pad_token_id(model)), (mm_tt, 0), (pos3, 0)]
    )
    attended = new_mask.bool()
    text_pos = (new_mask.long().cumsum(-1) - 1).masked_fill(~attended, 0)
    position_ids = torch.cat([text_pos[None].to(new_pos3.dtype), new_pos3], dim=0)  # (4, B, L')
    max_pos = new_pos3.masked_fill(~attended[None], 0).amax(dim=(0, 2))
    inner.rope_deltas = (max_pos + 1 - attended.sum(1)).unsqueeze(1)  # model convention, (B, 1)

    stats = FoPruStats(
        tokens_in=list(n_merged),
        tokens_out=[int(k.numel()) for k in kept],
        prompt_tokens_in=attention_mask.sum(1).tolist(),
        prompt_tokens_out=new_mask.sum(1).tolist(),
        kept_indices=[k.cpu() for k in kept],
    )

    # 3. generate with the pruned features
    out = generate_with_features(
        model,
        gen,
        new_ids,
        pruned,
        feature_passing=feature_passing,
        attention_mask=new_mask,
        position_ids=position_ids,
        mm_token_type_ids=new_tt,
        **extra,
        **generate_kwargs,
    )
    if restore_prompt:
        out = restore_original_prompt(out, input_ids, new_ids)
    return out, stats
