"""Attention capture: hooks that recompute exactly the attention rows FoPru needs.

The model keeps its own attention implementation (sdpa and flash return no weights): the
hooks read the projections of ONE vision layer and recompute ``softmax(q k^T * scale)`` rows,
so the vision tower is never switched to eager. Two kinds of vision attention:

* :class:`AttentionRowCapture` — separate ``q_proj``/``k_proj`` (CLIP, SigLIP, ...), images
  as a batch ``(B, N, D)``.
* :class:`PackedQKVCapture` — a fused ``qkv`` linear with 2-D rotary embeddings over ONE packed
  sequence of all images, attention block-diagonal per image (``cu_seqlens``): Qwen2-VL and its
  successors.

Both expose ``attach()`` / ``remove()`` / ``reset()`` and are context managers.
"""

from __future__ import annotations

import torch
from torch import nn

from prunecore.rotary import apply_rotary

from .core import METHODS, packed_colmean

__all__ = [
    "AttentionRowCapture",
    "PackedQKVCapture",
    "resolve_layer",
    "vision_layers",
    "vision_tower",
]


def _attr_path(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def vision_tower(model: nn.Module) -> nn.Module:
    """The vision tower of an LVLM (``model.vision_tower``, ``vision_tower``, ``model.visual``, ``visual``)."""
    for path in ("model.vision_tower", "vision_tower", "model.visual", "visual"):
        tower = _attr_path(model, path)
        if tower is not None:
            return tower
    raise TypeError(f"{type(model).__name__}: no vision tower found (expected vision_tower/visual)")


def vision_layers(model_or_tower: nn.Module) -> nn.ModuleList:
    """The encoder layer list of a vision tower (CLIP/SigLIP: 5.0 ``vision_model.encoder.layers``,
    5.24 ``encoder.layers``; Qwen-VL: ``blocks``) or of an LVLM holding one."""
    tower = model_or_tower
    if not any(hasattr(tower, a) for a in ("encoder", "vision_model", "layers", "blocks")):
        tower = vision_tower(model_or_tower)
    for path in ("encoder.layers", "vision_model.encoder.layers", "layers", "blocks"):
        obj = _attr_path(tower, path)
        if isinstance(obj, nn.ModuleList):
            return obj
    raise TypeError(f"{type(tower).__name__}: cannot find the encoder layers of the vision tower")


def resolve_layer(n_layers: int, layer: int) -> int:
    """Module index of the layer producing ``hidden_states[layer]`` (0 = embeddings, -1 = last output)."""
    idx = layer + n_layers + 1 if layer < 0 else layer
    if not 1 <= idx <= n_layers:
        raise ValueError(f"layer={layer} is out of range for a vision tower with {n_layers} layers")
    return idx - 1


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")


class _Hooks:
    """Handle bookkeeping shared by the captures (subclasses define ``_register``)."""

    def __init__(self):
        self._handles: list = []
        self.rows: torch.Tensor | None = None

    def _register(self) -> list:
        raise NotImplementedError

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self):
        if not self._handles:
            self._handles = self._register()
        return self

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def reset(self) -> None:
        """Forget the last capture (called before each encode)."""
        self.rows = None

    def __enter__(self):
        return self.attach()

    def __exit__(self, *exc):
        self.remove()
        return False


class AttentionRowCapture(_Hooks):
    """Hooks that recompute the FoPru attention rows of one vision attention module.

    After each forward of the tower, :attr:`rows` holds ``(B, heads, N)`` float32:
    ``A[:, :, 0, :]`` (``method="cls"``) or ``A.mean(2)`` (``method="colmean"``), where
    ``A = softmax(q k^T * scale)`` — the eager attention probabilities (no mask: the vision
    encoders of LLaVA/SigLIP attend over all patches). ``colmean`` runs over blocks of
    ``query_block`` queries, so memory stays ``O(query_block * N)`` per head.
    """

    def __init__(self, attn_module: nn.Module, *, method: str = "cls", query_block: int = 256):
        super().__init__()
        for name in ("q_proj", "k_proj"):
            if not isinstance(getattr(attn_module, name, None), nn.Module):
                raise TypeError(
                    f"{type(attn_module).__name__} has no {name}; this capture needs separate q/k "
                    "projections (CLIP, SigLIP); fused-qkv towers use PackedQKVCapture"
                )
        _check_method(method)
        self.module = attn_module
        self.method = method
        self.query_block = int(query_block)
        heads = getattr(attn_module, "num_heads", None) or getattr(attn_module, "num_attention_heads", None)
        self.num_heads = int(heads if heads is not None else attn_module.config.num_attention_heads)
        self.scale = getattr(attn_module, "scale", None) or getattr(attn_module, "scaling", None)
        self._q = None

    def _register(self) -> list:
        return [
            self.module.q_proj.register_forward_hook(self._on_q),
            self.module.k_proj.register_forward_hook(self._on_k),
        ]

    def reset(self) -> None:
        super().reset()
        self._q = None

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
        kt = k.float().view(b, n, self.num_heads, d).permute(0, 2, 3, 1)  # (B, heads, d, N)
        if self.method == "cls":
            q0 = q[:, :1].float().view(b, 1, self.num_heads, d).transpose(1, 2) * scale  # the CLS query only
            return torch.softmax(q0 @ kt, dim=-1)[:, :, 0]
        qh = q.float().view(b, n, self.num_heads, d).transpose(1, 2) * scale  # scale (N, d), not (N, N)
        acc = torch.zeros(b, self.num_heads, n, dtype=torch.float32, device=q.device)
        for start in range(0, n, self.query_block):  # blocks of queries bound the N x N memory
            acc += torch.softmax(qh[:, :, start : start + self.query_block] @ kt, dim=-1).sum(dim=2)
        return acc / n

    @classmethod
    def for_model(cls, model: nn.Module, *, layer: int = -2, method: str = "cls") -> AttentionRowCapture:
        """Capture on the attention of the vision layer feeding ``hidden_states[layer]``."""
        layers = vision_layers(model)
        block = layers[resolve_layer(len(layers), layer)]
        attn = getattr(block, "self_attn", None) or getattr(block, "attn", None) or getattr(block, "attention", None)
        if attn is None:
            raise TypeError(f"{type(block).__name__}: no self_attn/attn module")
        return cls(attn, method=method)


class PackedQKVCapture(_Hooks):
    """Hooks on one packed-sequence vision ``attn`` (fused ``qkv``, 2-D rotary, ``cu_seqlens``).

    After each forward of the tower, :attr:`rows` is ``(heads, N_total)`` float32: for a
    packed patch ``j`` of segment ``s``, ``mean_{i in s} A_s[h, i, j]`` where
    ``A_s = softmax(q_s k_s^T * scale)`` is the eager attention of that segment (the attention
    is block-diagonal per ``cu_seqlens`` segment), with the rotary applied exactly as the
    model's ``apply_rotary_pos_emb_vision`` does (fp32 math, cast back to the activation dtype).
    :attr:`cu_seqlens` holds the segment boundaries (a CPU tensor). Only ``method="colmean"``
    (these towers have no CLS token). Queries run in blocks of at most
    ``max_block_elems / (heads * n_s)`` rows, so memory stays bounded for big images.
    """

    def __init__(self, attn_module: nn.Module, *, method: str = "colmean", max_block_elems: int = 1 << 24):
        super().__init__()
        if method == "cls":
            raise ValueError("method='cls' needs a CLS token; this vision tower has none: use method='colmean'")
        if method != "colmean":
            raise ValueError(f"unknown method {method!r}; packed-sequence towers support only 'colmean'")
        if not isinstance(getattr(attn_module, "qkv", None), nn.Linear):
            raise TypeError(f"{type(attn_module).__name__} has no fused qkv linear: not a packed-sequence attention")
        self.module = attn_module
        self.method = method
        self.num_heads = int(attn_module.num_heads)
        self.scale = float(getattr(attn_module, "scaling", None) or (attn_module.head_dim**-0.5))
        self.max_block_elems = int(max_block_elems)
        self._ctx: tuple | None = None
        self.cu_seqlens: torch.Tensor | None = None

    def _register(self) -> list:
        return [
            self.module.register_forward_pre_hook(self._on_attn_pre, with_kwargs=True),
            self.module.qkv.register_forward_hook(self._on_qkv),
        ]

    def reset(self) -> None:
        super().reset()
        self._ctx = None
        self.cu_seqlens = None

    def _on_attn_pre(self, _mod, args, kwargs):
        cu = kwargs.get("cu_seqlens", args[1] if len(args) > 1 else None)
        pe = kwargs.get("position_embeddings", args[2] if len(args) > 2 else None)
        if cu is None or pe is None:
            raise RuntimeError("FoPru capture: vision attention called without cu_seqlens/position_embeddings")
        self._ctx = (cu, pe)

    def _on_qkv(self, _mod, _inp, out):
        if self._ctx is None:
            raise RuntimeError("FoPru capture: qkv ran outside its attention module; unsupported layout")
        cu, (cos, sin) = self._ctx
        self._ctx = None
        self.cu_seqlens = cu.detach().to(torch.long).cpu()
        self.rows = self.compute_rows(out.detach(), cos.detach(), sin.detach(), self.cu_seqlens)

    def compute_rows(
        self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cu_seqlens: torch.Tensor
    ) -> torch.Tensor:
        """qkv: ``(N, 3*heads*d)``; cos, sin: ``(N, d)``; cu_seqlens: ``(S+1,)`` -> ``(heads, N)``."""
        n = qkv.shape[0]
        q, k, _ = qkv.reshape(n, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)  # (N, heads, d)
        c, s = cos.unsqueeze(-2).float(), sin.unsqueeze(-2).float()  # fp32 math, cast back to q's dtype
        q = apply_rotary(q, c, s).transpose(0, 1)  # (heads, N, d)
        k = apply_rotary(k, c, s).transpose(0, 1)
        return packed_colmean(q, k, cu_seqlens, scale=self.scale, max_block_elems=self.max_block_elems)

    def segment_scores(self) -> list[torch.Tensor]:
        """Head-mean colmean score of every patch, one ``(n_s,)`` tensor per segment."""
        if self.rows is None:
            raise RuntimeError("FoPru capture hooks did not fire: the chosen vision block was not run")
        return list(torch.split(self.rows.mean(0), torch.diff(self.cu_seqlens).tolist()))
