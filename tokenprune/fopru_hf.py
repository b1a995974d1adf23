"""FoPru adapter for Hugging Face transformers LVLMs (LLaVA-style), no fork, no global patching.

Three pieces, all instance-level and removable:

* :class:`AttentionRowCapture` — forward hooks on one vision layer's ``q_proj``/``k_proj``
  that recompute exactly the attention rows FoPru needs (the CLS query row, or the query-mean
  of every column) as ``softmax(q k^T * scale)``.  Works whatever the model's attention
  implementation is (sdpa returns no weights): the vision tower is never switched to eager.
* :func:`fopru_generate` — encodes the images once with the capture hooks, scores and selects
  the visual tokens (:mod:`tokenprune.fopru`), shrinks every image's placeholder run in
  ``input_ids``/``attention_mask`` to its K, and calls the model's own ``generate`` with the
  pruned features (``mm_encoder_outputs`` when ``forward`` accepts it — detected by signature —
  else an ``inputs_embeds`` fallback).  Returns ``(sequences, stats)``.
* :class:`FoPru` — ``with FoPru(model, keep=0.25): model.generate(**inputs)``; wraps the
  instance's ``generate`` and restores it (and removes the hooks) on exit, even on exception.

Supported: ``LlavaForConditionalGeneration`` (transformers 5.x; fixed-size images) with a
CLIP or SigLIP vision tower.  Dispatched on ``config.model_type``:
``LlavaNextForConditionalGeneration`` (any-res) to :mod:`tokenprune.fopru_llava_next` and
``Qwen2VLForConditionalGeneration`` to :mod:`tokenprune.fopru_qwen2vl`.
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from numbers import Integral
from typing import Any

import torch
from torch import nn

from .fopru import fopru_scores, fopru_select, keep_to_count

__all__ = [
    "AttentionRowCapture",
    "FoPru",
    "FoPruStats",
    "fopru_generate",
    "generate_with_features",
    "pad_token_id",
    "prune_mm_inputs",
    "restore_original_prompt",
    "vision_layers",
]


# --------------------------------------------------------------------------- model plumbing
def _vision_tower(model: nn.Module) -> nn.Module:
    tower = None
    if hasattr(model, "get_encoder"):
        try:
            tower = model.get_encoder("image")
        except (TypeError, ValueError):
            tower = None
    if tower is None or tower is model or tower is getattr(model, "model", None):
        for path in ("model.vision_tower", "vision_tower", "model.visual", "visual"):
            obj = model
            for part in path.split("."):
                obj = getattr(obj, part, None)
                if obj is None:
                    break
            if obj is not None:
                tower = obj
                break
    if tower is None or tower is model:
        raise TypeError(f"{type(model).__name__}: no vision tower found (expected vision_tower/visual)")
    return tower


def vision_layers(model_or_tower: nn.Module) -> nn.ModuleList:
    """The encoder layer list of a vision tower (CLIP/SigLIP: 5.0 ``vision_model.encoder.layers``,
    5.24 ``encoder.layers``) or of an LVLM holding one."""
    tower = model_or_tower
    if not any(hasattr(tower, a) for a in ("encoder", "vision_model", "layers")):
        tower = _vision_tower(model_or_tower)
    for path in ("encoder.layers", "vision_model.encoder.layers", "layers", "blocks"):
        obj = tower
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList):
            return obj
    raise TypeError(f"{type(tower).__name__}: cannot find the encoder layers of the vision tower")


def _resolve_layer(layers: nn.ModuleList, layer: int) -> nn.Module:
    """``layer`` follows ``vision_feature_layer`` indexing of ``hidden_states`` (0 = embeddings,
    -1 = last layer output); the attention used is the one inside the layer producing it."""
    n = len(layers)
    idx = layer + n + 1 if layer < 0 else layer
    if not 1 <= idx <= n:
        raise ValueError(f"layer={layer} is out of range for a vision tower with {n} layers")
    return layers[idx - 1]


class AttentionRowCapture:
    """Hooks that recompute the FoPru attention rows of one vision attention module.

    After each forward of the tower, :attr:`rows` holds ``(B, heads, N)`` float32:
    ``A[:, :, 0, :]`` (``method="cls"``) or ``A.mean(2)`` (``method="colmean"``), where
    ``A = softmax(q k^T * scale)`` — the eager attention probabilities (no mask: vision
    encoders of LLaVA/SigLIP attend over all patches).

    Use as a context manager or call :meth:`attach` / :meth:`remove`.
    """

    def __init__(self, attn_module: nn.Module, *, method: str = "cls", query_block: int = 256):
        for name in ("q_proj", "k_proj"):
            if not isinstance(getattr(attn_module, name, None), nn.Module):
                raise TypeError(
                    f"{type(attn_module).__name__} has no {name}; FoPru hooks need separate q/k "
                    "projections (CLIP, SigLIP); Qwen2-VL has its own adapter (tokenprune.fopru_qwen2vl), "
                    "other fused-qkv encoders (e.g. Qwen2.5-VL) are not supported."
                )
        if method not in ("cls", "colmean"):
            raise ValueError(f"unknown method {method!r}; expected 'cls' or 'colmean'")
        self.module = attn_module
        self.method = method
        self.query_block = int(query_block)
        heads = getattr(attn_module, "num_heads", None) or getattr(attn_module, "num_attention_heads", None)
        if heads is None:
            heads = attn_module.config.num_attention_heads
        self.num_heads = int(heads)
        self.scale = getattr(attn_module, "scale", None) or getattr(attn_module, "scaling", None)
        self._q = None
        self._handles: list = []
        self.rows: torch.Tensor | None = None

    # hooks -----------------------------------------------------------------
    def _on_q(self, _mod, _inp, out):
        self._q = out.detach()

    def _on_k(self, _mod, _inp, out):
        if self._q is None:
            raise RuntimeError("FoPru capture: k_proj ran before q_proj; unsupported attention module")
        self.rows = self.compute_rows(self._q, out.detach())
        self._q = None

    def compute_rows(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """q, k: ``(B, N, heads*d)`` projection outputs -> ``(B, heads, N)`` float32 rows."""
        b, n, dim = q.shape
        d = dim // self.num_heads
        scale = self.scale if self.scale is not None else d**-0.5
        qh = q.float().view(b, n, self.num_heads, d).transpose(1, 2)
        kh = k.float().view(b, n, self.num_heads, d).transpose(1, 2)
        if self.method == "cls":
            return torch.softmax(qh[:, :, :1] @ kh.transpose(-1, -2) * scale, dim=-1)[:, :, 0]
        acc = torch.zeros(b, self.num_heads, n, dtype=torch.float32, device=q.device)
        for start in range(0, n, self.query_block):  # blocks of queries bound the N x N memory
            blk = qh[:, :, start : start + self.query_block]
            acc += torch.softmax(blk @ kh.transpose(-1, -2) * scale, dim=-1).sum(dim=2)
        return acc / n

    # lifecycle -------------------------------------------------------------
    def attach(self) -> AttentionRowCapture:
        if not self._handles:
            self._handles = [
                self.module.q_proj.register_forward_hook(self._on_q),
                self.module.k_proj.register_forward_hook(self._on_k),
            ]
        return self

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._q = None

    def __enter__(self):
        return self.attach()

    def __exit__(self, *exc):
        self.remove()
        return False

    @classmethod
    def for_model(cls, model: nn.Module, *, layer: int = -2, method: str = "cls") -> AttentionRowCapture:
        """Capture on the attention of the vision layer feeding ``hidden_states[layer]``."""
        block = _resolve_layer(vision_layers(model), layer)
        attn = getattr(block, "self_attn", None) or getattr(block, "attn", None) or getattr(block, "attention", None)
        if attn is None:
            raise TypeError(f"{type(block).__name__}: no self_attn/attn module")
        return cls(attn, method=method)


# --------------------------------------------------------------------------- stats
@dataclass
class FoPruStats:
    """Counters of one pruned generate call."""

    tokens_in: list[int] = field(default_factory=list)  # visual tokens per image before
    tokens_out: list[int] = field(default_factory=list)  # after (K per image)
    prompt_tokens_in: list[int] = field(default_factory=list)  # attended prompt tokens per sample
    prompt_tokens_out: list[int] = field(default_factory=list)
    kept_indices: list[torch.Tensor] = field(default_factory=list)  # per image, sorted

    @property
    def prefill_tokens_saved(self) -> int:
        return int(sum(self.tokens_in) - sum(self.tokens_out))

    def as_dict(self) -> dict:
        return {
            "tokens_in": list(self.tokens_in),
            "tokens_out": list(self.tokens_out),
            "prompt_tokens_in": list(self.prompt_tokens_in),
            "prompt_tokens_out": list(self.prompt_tokens_out),
            "prefill_tokens_saved": self.prefill_tokens_saved,
        }


# --------------------------------------------------------------------------- input surgery
def prune_mm_inputs(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    image_token_id: int,
    tokens_per_image: Sequence[int],
    kept: Sequence[torch.Tensor],
    *,
    pad_token_id: int = 0,
    padding_side: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shrink each image's placeholder run to its kept tokens.

    Args:
        input_ids: ``(B, L)``; image placeholders appear, in order, as one run per image.
        attention_mask: ``(B, L)`` or None (all ones).
        image_token_id: the placeholder id.
        tokens_per_image: N_i per image, in the order images appear (row-major over the batch).
        kept: per image, sorted indices in ``[0, N_i)`` to keep.
        pad_token_id: value of new padding positions.
        padding_side: ``"left"``/``"right"``; None = the side the input was padded on
            (right only if some row ends with a masked position; left otherwise, which is
            what decoder-only generation needs).

    Returns:
        ``(input_ids, attention_mask)`` re-padded to the longest row.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (B, L), got {tuple(input_ids.shape)}")
    b, L = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    is_img = input_ids == image_token_id
    n_img = int(is_img.sum())
    if n_img != sum(tokens_per_image):
        raise ValueError(f"input_ids hold {n_img} image tokens but the images have {sum(tokens_per_image)} features")
    # keep mask over the flattened image positions (row-major = masked_scatter order)
    img_keep = torch.zeros(n_img, dtype=torch.bool, device=input_ids.device)
    offsets = [0]
    for n in tokens_per_image:
        offsets.append(offsets[-1] + int(n))
    flat_kept = torch.cat([idx.to(input_ids.device) + off for idx, off in zip(kept, offsets[:-1])])
    img_keep[flat_kept] = True
    keep = torch.ones_like(is_img)
    keep[is_img] = img_keep
    lengths = keep.sum(1)
    new_len = int(lengths.max())
    if padding_side is None:
        padding_side = "right" if bool((attention_mask[:, -1] == 0).any()) else "left"
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    left = padding_side == "left"
    new_ids = torch.full((b, new_len), pad_token_id, dtype=input_ids.dtype, device=input_ids.device)
    new_mask = torch.zeros((b, new_len), dtype=attention_mask.dtype, device=attention_mask.device)
    # target column of every kept token (vectorised per batch via cumsum)
    col = keep.long().cumsum(1) - 1
    if left:
        col = col + (new_len - lengths)[:, None]
    rows = torch.arange(b, device=input_ids.device)[:, None].expand(b, L)
    new_ids[rows[keep], col[keep]] = input_ids[keep]
    new_mask[rows[keep], col[keep]] = attention_mask[keep]
    return new_ids, new_mask


def _is_qwen2vl(model: nn.Module) -> bool:
    return getattr(getattr(model, "config", None), "model_type", None) == "qwen2_vl"


# config.model_type -> (module, function) of the model families with their own FoPru adapter
_ADAPTERS = {
    "llava_next": ("tokenprune.fopru_llava_next", "fopru_generate_llava_next"),
    "qwen2_vl": ("tokenprune.fopru_qwen2vl", "fopru_generate_qwen2vl"),
}


def _model_adapter(model: nn.Module) -> Callable | None:
    """The ``fopru_generate`` adapter for ``model``'s family, or None for plain LLaVA."""
    entry = _ADAPTERS.get(getattr(getattr(model, "config", None), "model_type", None))
    if entry is None:
        return None
    return getattr(importlib.import_module(entry[0]), entry[1])


def _accepts_mm_encoder_outputs(model: nn.Module) -> bool:
    return "mm_encoder_outputs" in inspect.signature(model.forward).parameters


def _get(inputs: Any, key: str, default=None):
    if isinstance(inputs, dict) or hasattr(inputs, "get"):
        return inputs.get(key, default)
    return getattr(inputs, key, default)


def _per_image_keep(keep, n_images: int) -> list:
    if isinstance(keep, (list, tuple)):
        if len(keep) != n_images:
            raise ValueError(f"keep has {len(keep)} entries but the batch has {n_images} images")
        return list(keep)
    if isinstance(keep, torch.Tensor):
        raise TypeError("keep must be a float, an int or a list of them per image, not a tensor")
    return [keep] * n_images


def select_visual_tokens(
    scores: torch.Tensor,
    keep,
    *,
    strategy: str = "rank",
    grid: tuple[int, int] | None = None,
    row_mode: str = "rows",
) -> list[torch.Tensor]:
    """Per-image selection for a batch of images that may each have their own ``keep``.

    ``scores``: ``(n_images, N)``. Images sharing a keep value are selected together.
    Returns a list of sorted index tensors.
    """
    n_images, n = scores.shape
    keeps = _per_image_keep(keep, n_images)
    ks = [keep_to_count(n, kp) for kp in keeps]
    out: list[torch.Tensor | None] = [None] * n_images
    for k in sorted(set(ks)):
        ids = [i for i, kk in enumerate(ks) if kk == k]
        sel = fopru_select(scores[ids], k, strategy=strategy, grid=grid, row_mode=row_mode)
        for j, i in enumerate(ids):
            out[i] = sel[j]
    return out  # type: ignore[return-value]


def _validate_keep(keep) -> None:
    """Check ``keep`` before N is known (counts are re-checked against N at selection)."""
    if isinstance(keep, Integral) and not isinstance(keep, bool):
        if keep < 1:
            raise ValueError(f"keep={keep} tokens is out of range: need keep >= 1")
        return
    keep_to_count(10**6, keep)  # fraction range / type errors


def _default_grid(n: int) -> tuple[int, int] | None:
    side = int(math.isqrt(n))
    return (side, side) if side * side == n else None


# --------------------------------------------------------------------------- generate
def encode_and_score(
    model: nn.Module,
    pixel_values: torch.Tensor,
    *,
    layer: int | None = -2,
    method: str = "cls",
    capture: AttentionRowCapture | None = None,
    **feature_kwargs,
) -> tuple[list[torch.Tensor], torch.Tensor, int]:
    """Run the model's own ``get_image_features`` with attention capture.

    Returns ``(features, scores, n_prefix)``: the per-image projected features
    (list of ``(N_i, D)``), FoPru scores ``(n_images, N_patches)`` and how many leading
    feature tokens are not patches (1 when ``vision_feature_select_strategy="full"``).
    """
    cfg = model.config
    if layer is None:
        layer = cfg.vision_feature_layer
    if not isinstance(cfg.vision_feature_layer, int):
        raise ValueError("FoPru supports a single vision_feature_layer (int), not a list")
    own = capture is None
    if own:
        capture = AttentionRowCapture.for_model(model, layer=layer, method=method)
    try:
        capture.attach()
        capture.rows = None
        with torch.no_grad():
            out = model.get_image_features(pixel_values=pixel_values, return_dict=True, **feature_kwargs)
        rows = capture.rows
    finally:
        if own:
            capture.remove()
    if rows is None:
        raise RuntimeError("FoPru capture hooks did not fire: the chosen vision layer was not run")
    feats = out.pooler_output
    feats = list(feats) if not isinstance(feats, torch.Tensor) else list(feats.unbind(0))
    n_tok = rows.shape[-1]
    strat = feature_kwargs.get("vision_feature_select_strategy") or getattr(
        cfg, "vision_feature_select_strategy", "default"
    )
    has_cls = bool(getattr(getattr(_vision_tower(model), "embeddings", None), "class_embedding", None) is not None)
    n_prefix_tokens = 1 if has_cls else 0
    if method == "cls" and not has_cls:
        raise ValueError("method='cls' needs a CLS token; this vision tower has none: use method='colmean'")
    scores = fopru_scores(rows, method=method, num_prefix=n_prefix_tokens)
    n_feat = feats[0].shape[0]
    n_prefix = n_feat - scores.shape[1]
    if any(f.shape[0] != n_feat for f in feats) or n_prefix not in (0, 1):
        raise ValueError(
            f"FoPru: features ({[f.shape[0] for f in feats]} tokens) do not line up with the "
            f"{n_tok} vision tokens (strategy {strat!r}); variable-size images need "
            "LlavaNextForConditionalGeneration (the any-res adapter)"
        )
    return feats, scores, n_prefix


def fopru_generate(
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
    _generate: Callable | None = None,
    _capture: AttentionRowCapture | None = None,
    **generate_kwargs,
):
    """Generate with FoPru-pruned visual tokens.

    Args:
        model: a ``LlavaForConditionalGeneration`` (CLIP/SigLIP tower).
        processor_outputs: mapping with ``input_ids`` ``(B, L)``, ``pixel_values``
            ``(n_images, 3, H, W)``, optional ``attention_mask``.
        keep: fraction in (0, 1], int count, or a list with one of those per image.
        strategy, row_mode, grid: see :func:`tokenprune.fopru_select` (grid defaults to the
            square patch grid).
        layer: vision layer (``hidden_states`` index) whose attention scores the tokens;
            ``None`` = the model's ``vision_feature_layer``.
        method: ``"cls"`` or ``"colmean"`` (see :func:`tokenprune.fopru_scores`).
        feature_passing: ``"auto"`` (``mm_encoder_outputs`` if the model's ``forward`` accepts
            it, else ``inputs_embeds``), or force one of ``"mm_encoder_outputs"``,
            ``"inputs_embeds"``.
        restore_prompt: return the caller's original ``input_ids`` followed by the new tokens
            (so ``out[:, input_ids.shape[1]:]`` slicing keeps working); False returns the
            shrunk prompt that the LLM actually saw.
        kept_indices: bypass scoring with explicit per-image patch indices (baselines).
        **generate_kwargs: passed to ``model.generate`` (``max_new_tokens``, ``do_sample`` ...).

    Returns:
        ``(sequences_or_generate_output, FoPruStats)``.
    """
    adapter = _model_adapter(model)
    if adapter is not None:  # LLaVA-NeXT any-res packing / Qwen2-VL (fused-qkv tower, M-RoPE positions)
        return adapter(
            model,
            processor_outputs,
            keep=keep,
            strategy=strategy,
            layer=layer,
            method=method,
            row_mode=row_mode,
            grid=grid,
            feature_passing=feature_passing,
            restore_prompt=restore_prompt,
            kept_indices=kept_indices,
            _generate=_generate,
            _capture=_capture,
            **generate_kwargs,
        )
    if not hasattr(getattr(model, "config", None), "vision_feature_layer"):
        raise TypeError(
            f"FoPru does not support {type(model).__name__}: LLaVA-style models (vision_feature_layer) "
            "and Qwen2-VL only"
        )
    if feature_passing not in ("auto", "mm_encoder_outputs", "inputs_embeds"):
        raise ValueError(f"unknown feature_passing {feature_passing!r}")
    gen = _generate if _generate is not None else model.generate
    input_ids = _get(processor_outputs, "input_ids")
    pixel_values = _get(processor_outputs, "pixel_values")
    attention_mask = _get(processor_outputs, "attention_mask")
    if input_ids is None or pixel_values is None:
        raise ValueError("processor_outputs needs input_ids and pixel_values")
    extra = {
        k: v
        for k, v in (processor_outputs.items() if hasattr(processor_outputs, "items") else [])
        if k not in ("input_ids", "pixel_values", "attention_mask")
    }
    if extra.get("image_sizes") is not None:
        raise ValueError(
            f"FoPru: image_sizes (any-res / variable-size images) is not supported for "
            f"{type(model).__name__} (only LLaVA-NeXT's any-res packing is)"
        )
    extra.pop("image_sizes", None)
    feat_kwargs = {
        k: generate_kwargs.pop(k)
        for k in ("vision_feature_layer", "vision_feature_select_strategy")
        if k in generate_kwargs
    }

    feats, scores, n_prefix = encode_and_score(
        model, pixel_values, layer=layer, method=method, capture=_capture, **feat_kwargs
    )
    n_images, n_patch = scores.shape
    if kept_indices is None:
        g = grid if grid is not None else _default_grid(n_patch)
        if strategy == "row" and g is None:
            raise ValueError(f"strategy='row' needs grid=(H, W): {n_patch} patches is not a square")
        kept = select_visual_tokens(scores, keep, strategy=strategy, grid=g, row_mode=row_mode)
    else:
        if len(kept_indices) != n_images:
            raise ValueError(f"kept_indices has {len(kept_indices)} entries for {n_images} images")
        kept = [torch.as_tensor(k, dtype=torch.long).sort().values for k in kept_indices]
        for k in kept:
            if k.numel() == 0 or int(k.min()) < 0 or int(k.max()) >= n_patch:
                raise ValueError(f"kept_indices must be non-empty and within [0, {n_patch})")
    # feature-token indices (a CLS feature, if present, is always kept)
    kept_feat = [
        torch.cat([torch.arange(n_prefix), k.to(torch.long) + n_prefix]) if n_prefix else k.to(torch.long) for k in kept
    ]
    dev = feats[0].device
    pruned = [f[k.to(dev)] for f, k in zip(feats, kept_feat)]

    image_token_id = model.config.image_token_id
    new_ids, new_mask = prune_mm_inputs(
        input_ids,
        attention_mask,
        image_token_id,
        [f.shape[0] for f in feats],
        kept_feat,
        pad_token_id=pad_token_id(model),
    )
    base_mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
    stats = FoPruStats(
        tokens_in=[f.shape[0] for f in feats],
        tokens_out=[f.shape[0] for f in pruned],
        prompt_tokens_in=base_mask.sum(1).tolist(),
        prompt_tokens_out=new_mask.sum(1).tolist(),
        kept_indices=[k.cpu() for k in kept],
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


def pad_token_id(model: nn.Module) -> int:
    """The pad id used to re-pad shrunk prompts (generation config, then the configs; 0 if none)."""
    pad = model.generation_config.pad_token_id
    if pad is None:
        pad = getattr(model.config, "pad_token_id", None) or getattr(
            model.config.get_text_config(), "pad_token_id", None
        )
    if isinstance(pad, (list, tuple)):
        pad = pad[0]
    return int(pad) if pad is not None else 0


def generate_with_features(
    model: nn.Module,
    gen: Callable,
    new_ids: torch.Tensor,
    pruned: list[torch.Tensor],
    *,
    feature_passing: str,
    **kwargs,
):
    """Call ``gen`` on the shrunk prompt with the pruned image features.

    ``new_ids``: (B, L') prompt with ``sum_i K_i`` image placeholders; ``pruned``: per image
    ``(K_i, hidden)`` projected features. ``feature_passing="auto"`` uses ``mm_encoder_outputs``
    when the installed model's ``forward`` accepts it (checked by signature), else
    ``inputs_embeds`` (embeddings with the features scattered into the placeholders).
    ``kwargs`` (attention mask, position ids, generate options) go to ``gen`` unchanged.
    """
    mode = feature_passing
    if mode == "auto":
        mode = "mm_encoder_outputs" if _accepts_mm_encoder_outputs(model) else "inputs_embeds"
    if mode == "mm_encoder_outputs":
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        outputs = {"image": BaseModelOutputWithPooling(pooler_output=pruned)}
        return gen(input_ids=new_ids, mm_encoder_outputs=outputs, **kwargs)
    emb = model.get_input_embeddings()(new_ids)
    img = torch.cat(pruned, 0).to(emb.device, emb.dtype)
    emb = emb.masked_scatter((new_ids == model.config.image_token_id).unsqueeze(-1).expand_as(emb), img)
    return gen(input_ids=new_ids, inputs_embeds=emb, **kwargs)


def restore_original_prompt(out, input_ids: torch.Tensor, new_ids: torch.Tensor):
    """Put the caller's prompt back in front of the generated tokens.

    Args:
        out: ``generate``'s output (a (B*R, L) tensor or an output with ``.sequences``), R =
            ``num_return_sequences`` (or beams returned).
        input_ids: (B, L0) the caller's original prompt; new_ids: (B, L1) the shrunk prompt the
            model saw.
    Returns:
        ``out`` with sequences ``[input_ids, new tokens]`` of shape (B*R, L0 + new).
    """
    seqs = out if isinstance(out, torch.Tensor) else out.sequences
    rep = seqs.shape[0] // input_ids.shape[0]
    input_ids = input_ids.repeat_interleave(rep, 0).to(seqs.device)
    new_ids = new_ids.repeat_interleave(rep, 0).to(seqs.device)
    if seqs.shape[1] >= new_ids.shape[1] and torch.equal(seqs[:, : new_ids.shape[1]], new_ids):
        seqs = torch.cat([input_ids, seqs[:, new_ids.shape[1] :]], dim=1)
    else:  # generate returned only the new tokens (inputs_embeds path on some versions)
        seqs = torch.cat([input_ids, seqs], dim=1)
    if isinstance(out, torch.Tensor):
        return seqs
    out.sequences = seqs
    return out


class FoPru:
    """``with FoPru(model, keep=0.25): out = model.generate(**inputs)``.

    Wraps the *instance's* ``generate`` (the class is untouched) and attaches the attention
    capture hooks on enter; on exit (also on exception) the hooks are removed and ``generate``
    restored.  Each call's :class:`FoPruStats` is appended to :attr:`history`; the last one is
    :attr:`stats`.  Keyword arguments are those of :func:`fopru_generate`; extra
    model-specific ones (LLaVA-NeXT: ``anyres_norm``, ``newline``) are passed through.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        keep=0.25,
        strategy: str = "rank",
        layer: int | None = -2,
        method: str = "cls",
        row_mode: str = "rows",
        grid: tuple[int, int] | None = None,
        feature_passing: str = "auto",
        restore_prompt: bool = True,
        **model_options,
    ):
        self.model = model
        self.options = dict(
            keep=keep,
            strategy=strategy,
            layer=layer,
            method=method,
            row_mode=row_mode,
            grid=grid,
            feature_passing=feature_passing,
            restore_prompt=restore_prompt,
            **model_options,  # model-specific (LLaVA-NeXT: anyres_norm=, newline=)
        )
        # validate early (clear errors before any forward)
        _vision_tower(model)
        for kp in keep if isinstance(keep, (list, tuple)) else [keep]:
            _validate_keep(kp)
        self.history: list[FoPruStats] = []
        self._capture: AttentionRowCapture | None = None
        self._had_attr = False
        self._prev_attr = None
        self._active = False

    @property
    def stats(self) -> FoPruStats | None:
        return self.history[-1] if self.history else None

    def __enter__(self) -> FoPru:
        if self._active:
            raise RuntimeError("FoPru context is already active")
        m = self.model
        layer = self.options["layer"]
        if _is_qwen2vl(m):
            from .fopru_qwen2vl import Qwen2VLAttentionCapture

            self._capture = Qwen2VLAttentionCapture.for_model(m, layer=layer, method=self.options["method"]).attach()
        else:
            if layer is None:
                layer = m.config.vision_feature_layer
            self._capture = AttentionRowCapture.for_model(m, layer=layer, method=self.options["method"]).attach()
        self._had_attr = "generate" in m.__dict__
        self._prev_attr = m.__dict__.get("generate")
        orig = m.generate

        def generate(*args, **kwargs):
            if args:
                kwargs = {"input_ids": args[0], **kwargs}
            if kwargs.get("pixel_values") is None:  # text-only call: nothing to prune
                return orig(**kwargs)
            names = ("input_ids", "pixel_values", "attention_mask", "image_sizes")
            inputs = {k: kwargs.pop(k) for k in names if k in kwargs}
            out, st = fopru_generate(m, inputs, _generate=orig, _capture=self._capture, **self.options, **kwargs)
            self.history.append(st)
            return out

        m.generate = generate
        self._active = True
        return self

    def __exit__(self, *exc) -> bool:
        m = self.model
        try:
            if self._capture is not None:
                self._capture.remove()
        finally:
            self._capture = None
            if self._had_attr:
                m.generate = self._prev_attr
            else:
                m.__dict__.pop("generate", None)
            self._active = False
        return False
