"""LLaDA (8B Base / Instruct, LLaDA-1.5): the published ``config.json`` and safetensors layout.

Keys: ``model.transformer.wte.weight``; per block ``model.transformer.blocks.N.{attn_norm,
q_proj, k_proj, v_proj, attn_out, ff_norm, ff_proj, up_proj, ff_out}.weight``;
``model.transformer.ln_f.weight``; head ``model.transformer.ff_out.weight`` (absent with
``weight_tying``). Forward: RMSNorm, RoPE over the full head dim (rotate-half, float32 when
``rope_full_precision``), bidirectional attention, MLP ``ff_out(silu(ff_proj(h)) * up_proj(h))``,
final ``ln_f``; logits over ``embedding_size``, used unshifted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .base import DLLMConfig, NativeBlock, NativeDLLM, RMSNorm, check_positive, head_dim_of, register_family

__all__ = ["LLaDAConfig", "LLaDAModelLM"]


@dataclass
class LLaDAConfig(DLLMConfig):
    """The fields of LLaDA's ``config.json`` that shape the network (defaults: LLaDA-8B)."""

    d_model: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None
    mlp_hidden_size: int | None = None
    mlp_ratio: int = 4
    vocab_size: int = 126464
    embedding_size: int | None = None
    rope: bool = True
    rope_theta: float = 10000.0
    rope_full_precision: bool = True
    rms_norm_eps: float = 1e-5
    layer_norm_type: str = "rms"
    layer_norm_with_affine: bool = True
    bias_for_layer_norm: bool | None = None
    activation_type: str = "silu"
    block_type: str = "llama"
    weight_tying: bool = False
    include_bias: bool = False
    include_qkv_bias: bool = False
    scale_logits: bool = False
    input_emb_norm: bool = False
    alibi: bool = False
    block_group_size: int = 1
    attention_layer_norm: bool = False
    clip_qkv: float | None = None
    max_sequence_length: int = 4096

    def validate(self) -> None:
        check_positive(self, "d_model", "n_layers", "n_heads", "vocab_size")
        wanted = {
            "rope": True,
            "layer_norm_type": "rms",
            "activation_type": "silu",
            "block_type": "llama",
            "scale_logits": False,
            "input_emb_norm": False,
            "alibi": False,
            "block_group_size": 1,
            "attention_layer_norm": False,
            "clip_qkv": None,
        }
        for name, value in wanted.items():
            if getattr(self, name) != value:
                raise ValueError(
                    f"LLaDA config {name}={getattr(self, name)!r} is not supported (the released LLaDA "
                    f"checkpoints use {value!r})"
                )
        head_dim_of(self.d_model, self.n_heads)

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def mlp_size(self) -> int:
        return self.mlp_hidden_size or self.mlp_ratio * self.d_model

    @property
    def vocab_rows(self) -> int:
        return self.embedding_size or self.vocab_size


class LLaDABlock(NativeBlock):
    """``model.transformer.blocks.N``."""

    def __init__(self, c: LLaDAConfig):
        super().__init__(c.n_heads, c.kv_heads, head_dim_of(c.d_model, c.n_heads))
        norm_bias = c.include_bias if c.bias_for_layer_norm is None else c.bias_for_layer_norm
        qkv_bias = c.include_bias or c.include_qkv_bias
        hd, d = self.head_dim, c.d_model
        self.attn_norm = RMSNorm(d, c.rms_norm_eps, affine=c.layer_norm_with_affine, bias=norm_bias)
        self.q_proj = nn.Linear(d, c.n_heads * hd, bias=qkv_bias)
        self.k_proj = nn.Linear(d, c.kv_heads * hd, bias=qkv_bias)
        self.v_proj = nn.Linear(d, c.kv_heads * hd, bias=qkv_bias)
        self.attn_out = nn.Linear(d, d, bias=c.include_bias)
        self.ff_norm = RMSNorm(d, c.rms_norm_eps, affine=c.layer_norm_with_affine, bias=norm_bias)
        self.ff_proj = nn.Linear(d, c.mlp_size, bias=c.include_bias)
        self.up_proj = nn.Linear(d, c.mlp_size, bias=c.include_bias)
        self.ff_out = nn.Linear(c.mlp_size, d, bias=c.include_bias)

    def parts(self):
        return (
            self.attn_norm,
            self.q_proj,
            self.k_proj,
            self.v_proj,
            self.attn_out,
            self.ff_norm,
            self.ff_proj,
            self.up_proj,
            self.ff_out,
        )


@register_family("llada")
class LLaDAModelLM(NativeDLLM):
    """LLaDA masked diffusion LM (``model_type "llada"``), no remote code."""

    config_class = LLaDAConfig

    def __init__(self, config: LLaDAConfig):
        super().__init__(config)
        c = config
        self.head_dim = head_dim_of(c.d_model, c.n_heads)
        self.rope_theta = float(c.rope_theta)
        self.rope_full_precision = bool(c.rope_full_precision)
        norm_bias = c.include_bias if c.bias_for_layer_norm is None else c.bias_for_layer_norm
        transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(c.vocab_rows, c.d_model),
                "blocks": nn.ModuleList(LLaDABlock(c) for _ in range(c.n_layers)),
                "ln_f": RMSNorm(c.d_model, c.rms_norm_eps, affine=c.layer_norm_with_affine, bias=norm_bias),
            }
        )
        if not c.weight_tying:
            transformer["ff_out"] = nn.Linear(c.d_model, c.vocab_rows, bias=c.include_bias)
        self.model = nn.Module()
        self.model.transformer = transformer

    def layers(self):
        return self.model.transformer["blocks"]

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.transformer["wte"](input_ids)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        t = self.model.transformer
        h = t["ln_f"](hidden)
        return t["ff_out"](h) if "ff_out" in t else h @ t["wte"].weight.T
