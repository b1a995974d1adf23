"""Dream (7B Base / Instruct): Qwen2.5 weights, bidirectional attention, shifted logits.

Keys (Qwen2 names): ``model.embed_tokens.weight``; per layer ``model.layers.N.{input_layernorm,
self_attn.{q,k,v}_proj.{weight,bias}, self_attn.o_proj.weight, post_attention_layernorm,
mlp.{gate,up,down}_proj.weight}``; ``model.norm.weight``; ``lm_head.weight`` (absent with
``tie_word_embeddings``). Forward: Qwen2 blocks (RMSNorm, grouped-query attention with q/k/v
biases, RoPE rotate-half) without the causal mask. The logits used for position ``i`` are the
model's logits at ``i - 1`` (``shift_logits``: Dream starts from an autoregressive LM).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from .base import DLLMConfig, NativeBlock, NativeDLLM, RMSNorm, check_positive, head_dim_of, register_family

__all__ = ["DreamConfig", "DreamModel"]


@dataclass
class DreamConfig(DLLMConfig):
    """The fields of Dream's ``config.json`` that shape the network (defaults: Dream-7B)."""

    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    vocab_size: int = 152064
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    max_position_embeddings: int = 131072
    shift_logits: ClassVar[bool] = True
    scaled_confidence: ClassVar[bool] = True

    def validate(self) -> None:
        check_positive(
            self, "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"
        )
        if self.hidden_act != "silu":
            raise ValueError(f"Dream config hidden_act={self.hidden_act!r} is not supported (Dream uses 'silu')")
        if self.rope_scaling is not None:
            raise ValueError(f"Dream config rope_scaling={self.rope_scaling!r} is not supported (Dream uses none)")
        head_dim_of(self.hidden_size, self.num_attention_heads)


class DreamAttention(nn.Module):
    """``self_attn``: q/k/v with bias, o without."""

    def __init__(self, c: DreamConfig, head_dim: int):
        super().__init__()
        d = c.hidden_size
        self.q_proj = nn.Linear(d, c.num_attention_heads * head_dim, bias=True)
        self.k_proj = nn.Linear(d, c.num_key_value_heads * head_dim, bias=True)
        self.v_proj = nn.Linear(d, c.num_key_value_heads * head_dim, bias=True)
        self.o_proj = nn.Linear(c.num_attention_heads * head_dim, d, bias=False)


class DreamMLP(nn.Module):
    """``mlp``: ``down(silu(gate(h)) * up(h))``."""

    def __init__(self, c: DreamConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)


class DreamLayer(NativeBlock):
    """``model.layers.N``."""

    def __init__(self, c: DreamConfig):
        head_dim = head_dim_of(c.hidden_size, c.num_attention_heads)
        super().__init__(c.num_attention_heads, c.num_key_value_heads, head_dim)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = DreamAttention(c, head_dim)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = DreamMLP(c)

    def parts(self):
        a, m = self.self_attn, self.mlp
        return (
            self.input_layernorm,
            a.q_proj,
            a.k_proj,
            a.v_proj,
            a.o_proj,
            self.post_attention_layernorm,
            m.gate_proj,
            m.up_proj,
            m.down_proj,
        )


@register_family("Dream")
class DreamModel(NativeDLLM):
    """Dream masked diffusion LM (``model_type "Dream"``), no remote code."""

    config_class = DreamConfig
    rope_full_precision = False  # Qwen2 applies the float32 tables in the activation dtype

    def __init__(self, config: DreamConfig):
        super().__init__(config)
        c = config
        self.head_dim = head_dim_of(c.hidden_size, c.num_attention_heads)
        self.rope_theta = float(c.rope_theta)
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.model.layers = nn.ModuleList(DreamLayer(c) for _ in range(c.num_hidden_layers))
        self.model.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        if not c.tie_word_embeddings:
            self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)

    def layers(self):
        return self.model.layers

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        h = self.model.norm(hidden)
        return self.lm_head(h) if hasattr(self, "lm_head") else h @ self.model.embed_tokens.weight.T
