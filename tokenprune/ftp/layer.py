"""The routed decoder layer: runs the original layer on the tokens its decision keeps.

See :mod:`tokenprune.ftp.attach` for the mechanics (gather, original layer on the kept
subsequence with its rotary embeddings and slots, scatter back; skipped tokens pass
unchanged) and :mod:`.decisions` for the decision itself.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from prunecore.rotary import apply_rotary

from .cache import CompactLayer, FTPCache
from .decisions import decide
from .state import FTPState, Route
from .train_forward import forward_train


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows of ``x (B or 1, T, ...)`` at ``index (B, K)`` along dim 1 -> ``(B, K, ...)``."""
    B, K = index.shape
    x = x.expand(B, *x.shape[1:])
    idx = index.reshape(B, K, *([1] * (x.ndim - 2))).expand(B, K, *x.shape[2:])
    return x.gather(1, idx)


class RoutedLayer(nn.Module):
    """Wraps one decoder layer instance; see the module docstring for the mechanics."""

    def __init__(self, layer: nn.Module, layer_idx: int, state: FTPState):
        super().__init__()
        self.layer = layer
        self.layer_idx = layer_idx
        self.state = state
        attn = getattr(layer, "self_attn", None)
        if attn is None or not hasattr(attn, "q_proj"):
            raise ValueError(f"decoder layer {layer_idx} ({type(layer).__name__}) has no self_attn.q_proj")
        if (
            getattr(attn, "sliding_window", None)
            or getattr(layer, "attention_type", "full_attention") != "full_attention"
        ):
            raise ValueError(
                f"decoder layer {layer_idx} uses per-layer sliding-window attention; FTP supports full attention "
                "and a model-wide window (Mistral config.sliding_window) only"
            )
        # Mistral-style: the window lives in the config and applies to every layer
        self.window = None if hasattr(attn, "sliding_window") else getattr(attn.config, "sliding_window", None)
        self.head_dim = int(attn.head_dim)
        cfg = attn.config
        self.n_heads = int(cfg.num_attention_heads)
        self.scaling = float(getattr(attn, "scaling", self.head_dim**-0.5))
        self.sdpa = getattr(cfg, "_attn_implementation", None) == "sdpa"
        self._q = None
        self._capture = False
        # the query before rotary: q_norm (Qwen3, (B, T, H, D)), Phi's q_layernorm ((B, H, T, D)), or q_proj
        name = next(n for n in ("q_norm", "q_layernorm", "q_proj") if getattr(attn, n, None) is not None)
        self._q_heads_first = name == "q_layernorm"
        self._hook = getattr(attn, name).register_forward_hook(self._q_hook)
        self._sig = inspect.signature(layer.forward)  # used only for positional calls (bound once per such call)
        self.cache_arg = "cache" if "cache" in self._sig.parameters else "past_key_values"

    # nn.Module attributes of the wrapped layer (e.g. attention_type) stay reachable
    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("layer"), name)

    def _q_hook(self, module, inputs, output):
        if self._capture:
            self._q = output

    def remove_hooks(self) -> None:
        self._hook.remove()

    def _count(self, keep: torch.Tensor, all_kept: bool) -> None:
        st = self.state
        if st.call_counted is None:
            return
        if all_kept:
            st.call_all[self.layer_idx] = True
        else:
            st.call_kept.append((self.layer_idx, (keep & st.call_counted).sum()))

    # ------------------------------------------------------------------ forward
    def forward(self, hidden_states, *args, **kwargs):
        st = self.state
        seq = st.cache
        if seq is None:
            return self.layer(hidden_states, *args, **kwargs)
        kw = self._bind(args, kwargs) if args else dict(kwargs)
        kw.pop("past_key_values", None)
        kw.pop("cache", None)
        kw[self.cache_arg] = seq
        lay = seq.layers[self.layer_idx]
        B, T, _ = hidden_states.shape
        past = st.past
        if lay.seen != past or seq.seq_valid.shape != (B, past + T):
            raise ValueError(
                f"routed layer {self.layer_idx} lost track of its cache ({lay.seen} slots cached, call at {past} "
                f"with hidden states {tuple(hidden_states.shape)}): attach FTP before the prefill"
            )
        valid_new = seq.seq_valid[:, past:]
        route = decide(st, self.layer_idx, seq, valid_new)
        st.prev_keep = route.keep
        lay.seen = past + T
        self._count(route.keep, route.kind == "all")
        if st.record:
            st.decisions[self.layer_idx].append(route.keep.detach())
        if st.training:
            return forward_train(self, seq, lay, hidden_states, kw, route, valid_new)
        if route.kind == "none":
            lay.complete = False
            return hidden_states
        if route.kind == "all" and lay.complete:
            # the model's own arguments: this layer's cache holds every slot, in order
            slots = st.new_slots
            lay.pending = (slots, valid_new)
            lay.holes = lay.holes or not st.new_all_valid
            out = self.call_layer(hidden_states, kw)
            self.update_scores(seq, lay, kw.get("position_embeddings"), slots, valid_new, st.new_all_valid)
            return out
        return self._routed(seq, lay, hidden_states, kw, route)

    def _routed(self, seq: FTPCache, lay: CompactLayer, hidden: torch.Tensor, kw: dict, route: Route):
        st = self.state
        past = st.past
        B, T, H = hidden.shape
        sel, ok = route.sel_idx, route.sel_ok
        if sel is None:
            h, Tq, q_slot = hidden, T, st.new_slots
        else:
            Tq = sel.shape[1]
            h = gather_tokens(hidden, sel)
            pe = kw.get("position_embeddings")
            if pe is not None:
                kw["position_embeddings"] = tuple(gather_tokens(t, sel) for t in pe)
            if kw.get("position_ids") is not None:
                kw["position_ids"] = gather_tokens(kw["position_ids"], sel)
            q_slot = past + sel
        lay.complete = lay.complete and route.kind == "all"  # every slot, in order, with its validity
        lay.holes = lay.holes or not route.all_ok
        kw["attention_mask"] = self._mask(lay, q_slot, ok, Tq, hidden.dtype)
        lay.pending = (q_slot, ok)
        out = self.call_layer(h, kw)
        if not route.all_ok:
            out = torch.where(ok[..., None], out, h)
        if sel is not None:
            out = hidden.scatter(1, sel[..., None].expand(B, Tq, H), out.to(hidden.dtype))
        self.update_scores(seq, lay, kw.get("position_embeddings"), q_slot, ok, route.all_ok)
        return out

    def _mask(self, lay: CompactLayer, q_slot, q_ok, Tq: int, dtype) -> torch.Tensor | None:
        """Additive mask (B, 1, Tq, N + Tq) over the layer's compact keys, or None when not needed.

        A query sees valid entries at slots <= its own (inside the window) and always itself.
        """
        n_old = lay.entries()
        window_bites = self.window is not None and self.state.cache.seq_valid.shape[1] > self.window
        if not lay.holes and not window_bites and (Tq == 1 or (n_old == 0 and self.sdpa)):
            return None  # every entry is valid and earlier: plain (causal) attention
        k_slot = q_slot if n_old == 0 else torch.cat([lay.slots, q_slot], 1)
        k_ok = q_ok if n_old == 0 else torch.cat([lay.valid, q_ok], 1)
        rel = k_slot[:, None, :] - q_slot[:, :, None]  # (B, Tq, K)
        allowed = k_ok[:, None, :] & (rel <= 0)
        if self.window is not None:
            allowed &= rel > -self.window
        allowed |= rel == 0
        mask = torch.zeros(allowed.shape, dtype=dtype, device=q_slot.device)
        mask.masked_fill_(~allowed, torch.finfo(dtype).min)
        return mask[:, None]

    def _bind(self, args, kwargs) -> dict:
        bound = self._sig.bind_partial(None, *args, **kwargs)
        out = dict(bound.arguments)
        out.pop(next(iter(self._sig.parameters)))
        extra = out.pop("kwargs", None)
        if extra:
            out.update(extra)
        return out

    def call_layer(self, h: torch.Tensor, kw: dict):
        """The wrapped layer on ``h`` with arguments ``kw``; captures the query when the score feature needs it."""
        self._capture = self.state.compute_scores and self.state.router.needs_scores
        try:
            return self.layer(h, **kw)
        finally:
            self._capture = False

    # ------------------------------------------------------------------ score feature
    @torch.no_grad()
    def update_scores(self, seq: FTPCache, lay: CompactLayer, pe, q_slot, q_ok, all_ok: bool) -> None:
        """Attention of the last computed token of each row to the layer's entries -> ``seq.score``.

        q_slot: (B, Tq) slots of the query rows the layer ran on; q_ok: (B, Tq) which of them
        are kept tokens; pe: the (cos, sin) the attention received for those rows.
        """
        q = self._q
        self._q = None
        if q is None:
            return
        if self._q_heads_first:
            q = q.transpose(1, 2)
        B, Tq = q_slot.shape
        q = q.reshape(B, Tq, -1, self.head_dim)
        if q.shape[2] != self.n_heads:
            raise ValueError(f"layer {self.layer_idx}: captured {q.shape[2]} query heads, expected {self.n_heads}")
        if all_ok:  # every row's last computed query is its last row
            q_last, q_slot_last = q[:, -1], q_slot[:, -1:]
            cs = None if pe is None else [t[:, -1:] for t in pe]
        else:
            rows = torch.arange(B, device=q.device)
            last = (Tq - 1) - q_ok.flip(1).to(torch.uint8).argmax(1)  # (B,) last computed row
            q_last, q_slot_last = q[rows, last], q_slot[rows, last][:, None]
            cs = None if pe is None else [t.expand(B, *t.shape[1:])[rows, last][:, None, :] for t in pe]
        if cs is not None:  # (B or 1, 1, d): broadcast over heads
            q_last = apply_rotary(q_last, cs[0].to(q_last.dtype), cs[1].to(q_last.dtype))
        keys = lay.keys  # (B, Hkv, N, D)
        g = self.n_heads // keys.shape[1]
        qg = q_last.reshape(B, keys.shape[1], g, self.head_dim).to(keys.dtype)
        logits = torch.matmul(qg, keys.transpose(-1, -2)).float() * self.scaling  # (B, Hkv, g, N)
        window_bites = self.window is not None and seq.seq_valid.shape[1] > self.window
        slots = lay.slots
        if all_ok and not lay.holes and not window_bites:
            # every entry is valid and at or before the last query: plain softmax, every slot updated
            a = torch.softmax(logits, dim=-1).mean((1, 2))  # (B, N)
            seq.score.scatter_(1, slots, torch.log1p(a * a.shape[1]))
            return
        ok = lay.valid & (slots <= q_slot_last)
        if window_bites:
            ok &= slots > q_slot_last - self.window
        if not all_ok:
            ok &= q_ok.any(1, keepdim=True)
        logits = logits.masked_fill(~ok[:, None, None, :], -float("inf"))
        a = torch.softmax(logits, dim=-1).nan_to_num(0.0).mean((1, 2))  # (B, N)
        feat = torch.log1p(a * ok.sum(1, keepdim=True).clamp_min(1))
        seq.score.scatter_(1, slots, torch.where(ok, feat, seq.score.gather(1, slots)))
