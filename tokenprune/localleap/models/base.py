"""Shared plumbing of the native diffusion LLMs (LLaDA, Dream) and their family registry.

A family is one module that subclasses :class:`NativeDLLM` and registers itself with
:func:`register_family` under the ``model_type`` its ``config.json`` carries. A new family
must implement:

* ``config_class``: a dataclass (see :class:`DLLMConfig`) with the published config fields;
  :meth:`DLLMConfig.from_dict` fills it from ``config.json`` (unknown keys such as ``auto_map``
  are kept in ``extra`` and never executed) and ``validate`` refuses unsupported options;
* ``__init__(config)``: modules named exactly like the checkpoint's safetensors keys;
* ``layers()``: the transformer blocks, each a :class:`NativeBlock` (norms + attention + MLP);
* ``embed(input_ids)`` and ``head(hidden)``: token embedding and final norm + LM head.

:class:`NativeDLLM` owns ``forward``: position ids (``cumsum(mask) - 1`` for left-padded
rows), the padding-key mask, rotary embeddings and the block-wise KV caches of Fast-dLLM:

* no cache: ``model(ids)`` scores every position; exact.
* prefix cache: ``model(ids[:, a:], past_key_values=prefix)`` where ``prefix`` holds the keys
  and values of positions ``[0, a)`` from an earlier pass (tuple of per-layer ``(k, v)``,
  ``(B, H_kv, a, D)``).
* dual cache: ``model(ids[:, a:b], past_key_values=full, replace_position=(a, b))`` where
  ``full`` covers every position; the new keys/values of ``[a, b)`` are written into ``full``
  in place and the queries attend to all positions.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from prunecore.registry import Registry
from prunecore.rotary import apply_rotary, rotary_cos_sin

__all__ = [
    "DLLMConfig",
    "DLLMOutput",
    "NativeBlock",
    "NativeDLLM",
    "RMSNorm",
    "FAMILIES",
    "register_family",
    "family_for",
    "rotary_cos_sin",
    "apply_rotary",
    "padded_positions",
]

#: ``config.json`` ``model_type`` (any case) -> family class; filled by discovery of the
#: ``models`` package (:meth:`prunecore.Registry.discover`), so a family module is never forgotten.
FAMILIES: Registry[type[NativeDLLM]] = Registry("diffusion LLM family (model_type)", fold_case=True)


def register_family(model_type: str):
    """Class decorator: register a :class:`NativeDLLM` subclass under ``model_type``
    (case-insensitive; a ``model_type`` already filed to another class is a ``ValueError``)."""
    file = FAMILIES.register(model_type)

    def add(cls):
        file(cls)
        cls.model_type = model_type
        return cls

    return add


def family_for(model_type: str) -> type[NativeDLLM]:
    """The registered class for a ``config.json`` ``model_type``; a clear error otherwise."""
    if not isinstance(model_type, str) or model_type not in FAMILIES:
        raise ValueError(
            f"model_type {model_type!r} is not a supported diffusion LLM; supported: "
            f"{FAMILIES.available()} (load other models yourself and pass them in)"
        )
    return FAMILIES[model_type]


@dataclass
class DLLMConfig:
    """Base of the family configs: the fields every dLLM needs, plus ``extra`` (everything else
    read from ``config.json``, e.g. ``auto_map``: kept, never executed).

    ``shift_logits`` is a fact of the family (Dream predicts token ``i`` from the output at
    ``i - 1``), set from ``model_type``, as is ``scaled_confidence`` (Dream reads the confidence
    from the temperature-scaled, top-p/top-k filtered distribution, LLaDA from the raw one);
    ``mask_token_id`` comes from the config file."""

    model_type: str = ""
    mask_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    shift_logits: ClassVar[bool] = False
    scaled_confidence: ClassVar[bool] = False
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DLLMConfig:
        """The config of a ``config.json`` dict, validated; ``mask_token_id`` is required (the
        decoding loop cannot run without it and never guesses it)."""
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in values.items() if k in names}
        cfg = cls(**known, extra={k: v for k, v in values.items() if k not in names})
        check_mask_token_id(cfg.mask_token_id)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Raise a ValueError naming an unsupported option (subclasses extend)."""

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**self.extra, **out}


@dataclass
class DLLMOutput:
    """``logits`` ``(B, L, V)`` for the fed positions; ``past_key_values`` per-layer ``(k, v)``
    ``(B, H_kv, T, D)`` over every position attended to (when ``use_cache``), else None."""

    logits: torch.Tensor
    past_key_values: tuple | None = None


class RMSNorm(nn.Module):
    """``weight * x / sqrt(mean(x^2) + eps) + bias``, normalised in float32, the affine part in the
    input dtype; ``affine=False`` has no weight (and no key in the checkpoint)."""

    def __init__(self, size: int, eps: float, *, affine: bool = True, bias: bool = False):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size)) if affine else None
        self.bias = nn.Parameter(torch.zeros(size)) if affine and bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        if self.weight is not None:
            h = self.weight * h
        return h + self.bias if self.bias is not None else h


def padded_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids of left-padded rows: ``cumsum(mask) - 1`` (pads get 0); ``(B, T)`` -> ``(B, T)`` long."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


class NativeBlock(nn.Module):
    """One pre-norm transformer block with bidirectional attention and a gated SiLU MLP.

    Subclasses name the submodules like the checkpoint and implement :meth:`parts`, which
    returns ``(attn_norm, q, k, v, o, mlp_norm, gate, up, down)``."""

    def __init__(self, n_heads: int, n_kv_heads: int, head_dim: int):
        super().__init__()
        if n_heads % n_kv_heads:
            raise ValueError(f"n_heads ({n_heads}) must be a multiple of n_kv_heads ({n_kv_heads})")
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim

    def parts(self):
        raise NotImplementedError

    def forward(self, x, cos, sin, key_mask, past, replace, *, rope_dtype):
        """``x`` (B, L, d); ``key_mask`` (B, 1, 1, T) bool or None; ``past`` (k, v) or None.

        Returns the new hidden states and the ``(k, v)`` the queries attended to."""
        attn_norm, q_proj, k_proj, v_proj, o_proj, mlp_norm, gate, up, down = self.parts()
        B, L, _ = x.shape
        h = attn_norm(x)
        q = q_proj(h).view(B, L, self.n_heads, self.head_dim).transpose(1, 2)
        k = k_proj(h).view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v_proj(h).view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = cos.to(rope_dtype), sin.to(rope_dtype)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if replace is not None:  # dual cache: write the fed positions into the full cache
            a, b = replace
            past[0][:, :, a:b] = k
            past[1][:, :, a:b] = v
            k, v = past
        elif past is not None:  # prefix cache
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        grouped = self.n_heads != self.n_kv_heads  # grouped-query attention without copying k/v
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, enable_gqa=grouped)  # bidirectional
        x = x + o_proj(att.transpose(1, 2).reshape(B, L, self.n_heads * self.head_dim))
        h = mlp_norm(x)
        return x + down(F.silu(gate(h)) * up(h)), (k, v)


class NativeDLLM(nn.Module):
    """Base of the native dLLMs; see the module docstring for what a family implements."""

    model_type: ClassVar[str] = ""
    config_class: ClassVar[type[DLLMConfig]] = DLLMConfig
    rope_theta: float
    head_dim: int
    rope_full_precision: bool = True

    def __init__(self, config: DLLMConfig):
        super().__init__()
        self.config = config

    @property
    def shift_logits(self) -> bool:
        """Whether the logits for position ``i`` are the model's at ``i - 1`` (the family's convention)."""
        return type(self.config).shift_logits

    @property
    def scaled_confidence(self) -> bool:
        """Whether the family's sampler reads confidences after temperature and top-p/top-k."""
        return type(self.config).scaled_confidence

    def layers(self) -> list[NativeBlock]:
        raise NotImplementedError

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: tuple | None = None,
        use_cache: bool = False,
        replace_position: tuple[int, int] | None = None,
        logits_range: tuple[int, int] | None = None,
    ) -> DLLMOutput:
        """Bidirectional forward.

        Args:
            input_ids: ``(B, L)`` the fed positions.
            attention_mask: ``(B, T)`` 1 = real token, 0 = padding, over every attended position
                (``T = L`` without cache, cached + fed with a prefix cache, the full length with a
                dual cache). Padding keys are masked for every query.
            position_ids: ``(B, L)``; default ``cumsum(mask) - 1`` sliced to the fed positions (or
                consecutive positions after the cache when there is no mask).
            past_key_values: prefix or full cache (see the module docstring).
            use_cache: return the per-layer ``(k, v)`` over all attended positions.
            replace_position: ``(a, b)`` for the dual cache: the fed ids are positions ``[a, b)``.
            logits_range: ``(i, j)`` indices into the fed positions: apply the LM head only there
                (the decoding loop needs the current block's logits, not the whole canvas's).
        Returns:
            :class:`DLLMOutput`; logits ``(B, L, V)`` float32 for the fed positions (``(B, j - i, V)``
            with ``logits_range``).
        """
        B, L = input_ids.shape
        if replace_position is not None:
            if past_key_values is None:
                raise ValueError("replace_position (dual cache) needs past_key_values over every position")
            start = int(replace_position[0])
            if int(replace_position[1]) - start != L:
                raise ValueError(f"replace_position {replace_position} does not span the {L} fed positions")
            total = past_key_values[0][0].shape[2]
        else:
            start = past_key_values[0][0].shape[2] if past_key_values is not None else 0
            total = start + L
        key_mask = None
        if attention_mask is not None:
            if attention_mask.shape != (B, total):
                raise ValueError(
                    f"attention_mask must be (B, T) = ({B}, {total}) over the cached and fed positions, "
                    f"got {tuple(attention_mask.shape)}"
                )
            key_mask = attention_mask.bool()[:, None, None, :]
            if position_ids is None:
                position_ids = padded_positions(attention_mask)[:, start : start + L]
        if position_ids is None:
            position_ids = torch.arange(start, start + L, device=input_ids.device).expand(B, L)
        cos, sin = rotary_cos_sin(position_ids, self.head_dim, self.rope_theta)
        x = self.embed(input_ids)
        rope_dtype = torch.float32 if self.rope_full_precision else x.dtype
        replace = (start, start + L) if replace_position is not None else None
        cache = []
        for i, block in enumerate(self.layers()):
            past = past_key_values[i] if past_key_values is not None else None
            x, kv = block(x, cos, sin, key_mask, past, replace, rope_dtype=rope_dtype)
            cache.append(kv)
        if logits_range is not None:
            x = x[:, logits_range[0] : logits_range[1]]
        return DLLMOutput(logits=self.head(x).float(), past_key_values=tuple(cache) if use_cache else None)

    @classmethod
    def from_config(cls, values: dict[str, Any]) -> NativeDLLM:
        """Build a randomly initialised model from a ``config.json`` dict (no weights)."""
        return cls(cls.config_class.from_dict(values))


def check_mask_token_id(mask_token_id) -> None:
    """Raise a ValueError naming the fix unless ``mask_token_id`` is a non-negative int."""
    if isinstance(mask_token_id, bool) or not isinstance(mask_token_id, int) or mask_token_id < 0:
        raise ValueError(
            f"config.json field 'mask_token_id' must be the model's mask token id (a non-negative int), got "
            f'{mask_token_id!r}: add it to config.json, e.g. "mask_token_id": 151666 for Dream-v0 or 126336 for '
            "LLaDA (the id of the tokenizer's mask token, <|mask|> / <|mdm_mask|>)"
        )


def check_positive(cfg: DLLMConfig, *names: str) -> None:
    """Raise a ValueError for a missing or non-positive integer config field."""
    for name in names:
        value = getattr(cfg, name)
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"config.json field {name!r} must be a positive int, got {value!r}")


def head_dim_of(hidden: int, heads: int) -> int:
    """``hidden / heads``, which must be an even integer (rotate-half RoPE)."""
    if hidden % heads or (hidden // heads) % 2:
        raise ValueError(f"hidden size {hidden} / {heads} heads must be an even integer head dim")
    return hidden // heads
