"""Routed decoder layers for transformers decoder-only LLMs (Llama, Qwen2, Mistral, Phi-style).

``attach_ftp(model, router, keep=...)`` swaps each ``model.model.layers[i]`` instance for a
:class:`RoutedLayer` wrapper (no transformers class is patched; :func:`detach_ftp` or leaving
the ``with`` block puts the original modules back).

What a routed layer does in one forward call (hidden states ``(B, T, H)``):

1. the router gives a keep probability per token (:mod:`tokenprune.ftp.router`); prefill keeps
   the top ``floor(keep_l * n_valid + 0.5)`` tokens of each row (``keep_l = 1 - s_l``), a
   decode step (one new token per row against a cache) keeps the token when
   ``router.decode_keep`` says so;
2. the kept tokens are gathered per row (padded to the largest kept count; no padding when
   every row keeps the same count, e.g. ``B == 1``) and the ORIGINAL decoder layer runs on
   that subsequence with their original rotary embeddings and position ids;
3. the outputs are scattered back; skipped tokens pass the block unchanged (identity).

KV cache: :class:`~tokenprune.ftp.cache.FTPCache` (swapped in for the model's empty cache at
the prefill). Each layer stores only the K/V of the tokens it computed, with their original
slots, so the KV memory shrinks with the sparsity and a kept token attends only to that
layer's compact cache. Attention needs no mask when a layer's cache has no invalid entry
(``B == 1``, no padding, no sliding window that bites); otherwise an explicit mask built on
the device from the stored slots.

Host synchronisation: none per layer in a decode step on a GPU. Prefill reads the per-row
valid counts once per forward (the top-k sizes). A decode decision is a device tensor; on a
GPU the token is computed and blended (``where(keep, out, h)``) and its K/V entry is marked
invalid when skipped, on CPU (where reading a value costs nothing) a token no row keeps
skips the layer entirely. Statistics stay on the device until :meth:`FTPHandle.stats`.

Padding (2-D ``attention_mask`` with zeros) is read by a pre-hook on the base model; padding
tokens are never routed into a block. In a decode step on a GPU the new token is assumed valid
(``generate`` appends ones to the mask).

Exactness: a schedule of all zeros leaves the model's own layers and cache in charge (logits
and generations are bit-identical to the plain model); a dense layer whose cache holds every
slot is called with the model's own arguments.

Sliding windows: a model-wide window (Mistral ``config.sliding_window``) is applied in the
masks. Per-layer sliding-window layers (Qwen2 ``use_sliding_window``, ``layer_types``) are
refused at attach. Partial rotary embeddings (Phi ``partial_rotary_factor``) work: the
attention receives the gathered cos/sin, and the score feature rotates the first
``rotary_dim`` channels of the query as those models do. Supported attention
implementations: ``sdpa`` and ``eager``.
"""

from __future__ import annotations

import contextlib
import inspect
import weakref
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from prunecore.budget import keep_count, keep_counts, torch_rank, torch_top_k
from tokenprune.stats import TokenStats

from .cache import CompactLayer, FTPCache, adopt, stand_in_for
from .router import RandomRouter, RouteInputs, Router, StaticRouter, keep_topk, normalised_positions, score_ranks
from .schedule import sparsity_schedule

_HANDLES: weakref.WeakKeyDictionary[nn.Module, FTPHandle] = weakref.WeakKeyDictionary()
_SUPPORTED_ATTN = ("sdpa", "eager")
PREFILL, DECODE = 0, 1  # statistics phases


# ----------------------------------------------------------------------------------------------
# model plumbing
# ----------------------------------------------------------------------------------------------
def find_decoder(model: nn.Module) -> tuple[nn.Module, nn.ModuleList]:
    """Return ``(base_model, layers)`` of a decoder-only transformers LLM.

    Accepts a ``*ForCausalLM`` (``model.model.layers``) or a base model (``model.layers``).
    """
    for base in (getattr(model, "model", None), model):
        layers = getattr(base, "layers", None) if base is not None else None
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return base, layers
    raise ValueError(
        f"{type(model).__name__} has no decoder layers at model.model.layers or model.layers; "
        "FTP supports Llama/Qwen2/Mistral-style decoder-only models"
    )


def validate_schedule(schedule, n_layers: int, *, allow_full: bool = False) -> list[float]:
    """Per-block target sparsities as a list of floats.

    Args:
        schedule: a float (uniform) or a sequence of ``n_layers`` floats.
        n_layers: number of decoder layers.
        allow_full: accept 1.0 (whole block removed; used by the ShortGPT baseline).
    Raises:
        ValueError: wrong length, NaN, or a value outside [0, 1) ([0, 1] with allow_full).
    """
    if isinstance(schedule, torch.Tensor):
        schedule = schedule.detach().cpu().tolist()
    if isinstance(schedule, (int, float)):
        schedule = [float(schedule)] * n_layers
    try:
        values = [float(x) for x in schedule]
    except TypeError as e:
        raise TypeError(f"schedule must be a float or a sequence of floats, got {type(schedule)}") from e
    if len(values) != n_layers:
        raise ValueError(f"schedule has {len(values)} entries but the model has {n_layers} decoder layers")
    hi_ok = (lambda v: v <= 1.0) if allow_full else (lambda v: v < 1.0)
    for i, v in enumerate(values):
        if v != v or v < 0.0 or not hi_ok(v):
            rng = "[0, 1]" if allow_full else "[0, 1)"
            raise ValueError(f"schedule[{i}] = {v} is outside {rng}: a sparsity is a fraction of tokens skipped")
    return values


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of ``x (..., D)`` with ``cos``/``sin (..., d)``, ``d <= D``.

    The first ``d`` channels are rotated (rotate-half layout), the rest pass unchanged: the
    partial-rotary convention of Phi / GPT-NeoX / StableLM; ``d == D`` is the Llama case.
    """
    d = cos.shape[-1]
    rot = x[..., :d]
    r1, r2 = rot.chunk(2, dim=-1)
    rot = rot * cos + torch.cat((-r2, r1), dim=-1) * sin
    return rot if d == x.shape[-1] else torch.cat([rot, x[..., d:]], dim=-1)


def reads_are_free(device: torch.device) -> bool:
    """Whether reading a tensor value on the host costs no device synchronisation (CPU tensors)."""
    return device.type == "cpu"


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows of ``x (B or 1, T, ...)`` at ``index (B, K)`` along dim 1 -> ``(B, K, ...)``."""
    B, K = index.shape
    x = x.expand(B, *x.shape[1:])
    idx = index.reshape(B, K, *([1] * (x.ndim - 2))).expand(B, K, *x.shape[2:])
    return x.gather(1, idx)


def layer_linear_flops(layer: nn.Module) -> int:
    """FLOPs per token of a decoder layer's linear maps (2 * weights); attention scores excluded."""
    return int(sum(2 * m.weight.numel() for m in layer.modules() if isinstance(m, nn.Linear)))


def block_budgets(schedule=None, n_layers: int = 0, *, keep=None, allow_full: bool = False):
    """Per-block ``(sparsities, keeps)`` from ``keep=`` or its alias ``schedule=`` (sparsity).

    ``keep = 1 - sparsity``; a float is uniform, a sequence gives one value per block; passing
    both is an error. The keep fractions are the budgets (``floor(keep * n + 0.5)`` tokens of
    each row, :func:`prunecore.budget.keep_counts`); the sparsities are the router's feature.
    """
    sparsity = validate_schedule(
        sparsity_schedule(keep, schedule, allow_full=allow_full), n_layers, allow_full=allow_full
    )
    if keep is None:
        return sparsity, [1.0 - v for v in sparsity]
    keeps = [float(keep)] * n_layers if np.ndim(keep) == 0 else [float(k) for k in keep]
    return sparsity, keeps


# ----------------------------------------------------------------------------------------------
# shared state
# ----------------------------------------------------------------------------------------------
@dataclass
class FTPState:
    """State shared by the routed layers of one model (one forward call at a time)."""

    router: Router
    schedule: list  # per block target sparsity (router feature)
    keep: list  # per block keep fraction (budget), 1 - schedule
    active: bool = True
    training: bool = False
    compute_scores: bool = True
    nested: bool = False  # no re-entry: prefer tokens the previous block computed
    prev_keep: torch.Tensor | None = None  # (B, T) decisions of the previous block in this call
    # the current call (set by the base model's pre-hook)
    cache: FTPCache | None = None  # routing state + compact KV; None = the plain model runs
    past: int = 0  # slots before this call
    n_new_host: list | None = None  # valid new tokens per row (host ints), None in a GPU decode step
    new_all_valid: bool = True  # host: every new token of every row is valid
    host_cheap: bool = True  # tensors on CPU: reading a value costs no device synchronisation
    stop_ids: torch.Tensor | None = None  # end-of-sequence ids: decode stats stop after one
    dense_alive: torch.Tensor | None = None  # (B,) EOS tracking while the plain model runs
    # decisions
    forced: list | None = None  # per layer (B, S_total) bool
    record: bool = False
    decisions: list = field(default_factory=list)
    new_slots: torch.Tensor | None = None  # (B, T) slots of this call's tokens
    # statistics, kept on the device and read by FTPHandle.stats(): per phase (PREFILL, DECODE)
    tokens: list = field(default_factory=list)  # tokens offered to every block (0-d tensors)
    kept: list = field(default_factory=list)  # (L,) tokens each block computed
    forward_passes: int = 0
    # this call's counting (flushed by the base model's forward hook)
    call_counted: torch.Tensor | None = None  # (B, T) bool, valid and before the row's EOS
    call_all: list = field(default_factory=list)  # per layer: computed every counted token
    call_kept: list = field(default_factory=list)  # (layer, 0-d tensor) for the other layers
    call_phase: int = PREFILL
    index_cache: dict = field(default_factory=dict)
    stand_ins: weakref.WeakKeyDictionary = field(default_factory=weakref.WeakKeyDictionary)  # caller cache -> FTPCache
    # training buffers (per layer)
    probs: list = field(default_factory=list)
    keeps: list = field(default_factory=list)
    static_keeps: list = field(default_factory=list)
    train_valid: list = field(default_factory=list)

    def reset_stats(self) -> None:
        n = len(self.schedule)
        self.tokens = [0, 0]
        self.kept = [torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.long)]
        self.forward_passes = 0
        self.call_counted = None

    def begin_call(self, counted: torch.Tensor, phase: int, all_layers: bool) -> None:
        """Start counting a forward call: ``counted`` (B, T) bool tokens that count."""
        self.call_counted, self.call_phase = counted, phase
        self.call_all = [all_layers] * len(self.schedule)
        self.call_kept = []

    def device_index(self, values: tuple, device) -> torch.Tensor:
        """``values`` as a device tensor, copied once per distinct pattern (no per-step host copy)."""
        key = (values, str(device))
        if key not in self.index_cache:
            self.index_cache[key] = torch.tensor(values, dtype=torch.long, device=device)
        return self.index_cache[key]

    def end_call(self) -> None:
        """Add this call's counts to the device totals (a few tensor ops per forward, no read-back)."""
        if self.call_counted is None:
            return
        p, n = self.call_phase, self.call_counted.sum()
        kept = self.kept[p].to(n.device)
        self.tokens[p] = self.tokens[p] + n
        kept = kept + n * self.device_index(tuple(self.call_all), n.device)
        if self.call_kept:
            idx = self.device_index(tuple(i for i, _ in self.call_kept), n.device)
            kept = kept.index_add(0, idx, torch.stack([v for _, v in self.call_kept]))
        self.kept[p] = kept
        self.call_counted = None

    def reset_decisions(self) -> None:
        self.decisions = [[] for _ in self.schedule]

    def clear_train(self) -> None:
        n = len(self.schedule)
        self.probs, self.keeps = [None] * n, [None] * n
        self.static_keeps, self.train_valid = [None] * n, [None] * n

    def dense_schedule(self) -> bool:
        """Every block keeps every token and nothing forces decisions: the plain model can run."""
        return not self.training and self.forced is None and all(s == 0.0 for s in self.schedule)


@dataclass
class Route:
    """One layer's decision for one call.

    kind: ``"none"`` (no token computed), ``"all"`` (every valid new token, in order),
    ``"select"`` (gather ``sel_idx``), ``"masked"`` (compute all new tokens, keep where
    ``keep``; used where skipping would need a host synchronisation).
    keep: (B, T) bool decisions; sel_idx: (B, Tq) ascending slots in the call or None (all T);
    sel_ok: (B, Tq) bool, which computed rows are kept tokens; all_ok: host flag, sel_ok is
    all True; prob / static: router probabilities and static decisions (training).
    """

    kind: str
    keep: torch.Tensor
    sel_idx: torch.Tensor | None = None
    sel_ok: torch.Tensor | None = None
    all_ok: bool = True
    prob: torch.Tensor | None = None
    static: torch.Tensor | None = None


# ----------------------------------------------------------------------------------------------
# the routed layer
# ----------------------------------------------------------------------------------------------
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

    # ------------------------------------------------------------------ decisions
    def _inputs(self, seq: FTPCache, valid_new: torch.Tensor, s: float, decode: bool) -> RouteInputs:
        """Router features of the new tokens; a decode step updates them incrementally (no sort)."""
        st = self.state
        past = st.past
        needs = st.router.needs_scores
        score = seq.score[:, past:]
        if decode:  # one new token: its position is the last (1; 0 as its row's first valid token), its rank a count
            pos = (valid_new & (seq.n_valid >= 2)[:, None]).float()
            if needs:
                greater = ((seq.score[:, :past] > score) & seq.seq_valid[:, :past]).sum(1, keepdim=True)
                rank = torch.where(valid_new, greater / (seq.n_valid.clamp_min(2) - 1)[:, None], 1.0)
            else:
                rank = torch.zeros_like(pos)
        else:
            pos = normalised_positions(seq.seq_valid)[:, past:]
            rank = score_ranks(seq.score, seq.seq_valid)[:, past:] if needs else torch.zeros_like(pos)
        return RouteInputs(position=pos, score=score, rank=rank, sparsity=s, valid=valid_new, decode=decode)

    def _from_mask(self, keep: torch.Tensor) -> Route:
        """Route for an arbitrary (B, T) keep mask (replayed decisions; reads the counts)."""
        counts = keep.sum(1).tolist()
        Tq = max(counts) if counts else 0
        if Tq == 0:
            return Route("none", keep)
        all_ok = min(counts) == Tq
        if all_ok and Tq == keep.shape[1]:
            return Route("all", keep, sel_ok=keep)
        sel = torch_top_k(keep.to(torch.uint8), Tq)
        return Route("select", keep, sel_idx=sel, sel_ok=keep.gather(1, sel), all_ok=all_ok)

    def _decide(self, seq: FTPCache, hidden: torch.Tensor, valid_new: torch.Tensor) -> Route:
        st, i = self.state, self.layer_idx
        s, keep_frac = st.schedule[i], st.keep[i]
        past, (B, T) = st.past, valid_new.shape
        decode = past > 0 and T == 1
        if st.forced is not None:
            f = st.forced[i]
            if f.shape[1] < past + T:
                raise ValueError(f"forced decisions for layer {i} cover {f.shape[1]} tokens, need {past + T}")
            return self._from_mask(f[:, past : past + T].to(valid_new.device) & valid_new)
        if s >= 1.0:
            return Route("none", torch.zeros_like(valid_new))
        if not st.training and (s == 0.0 or (decode and st.router.decode_keeps_all)):
            return Route("all", valid_new, sel_ok=valid_new, all_ok=st.new_all_valid)
        inputs = self._inputs(seq, valid_new, s, decode)
        prob = st.router.keep_prob(inputs)
        if decode:
            keep = st.router.decode_keep(prob, inputs)
            if st.host_cheap:  # CPU: a token nobody keeps costs nothing
                n_kept = int(keep.sum())
                if n_kept == 0:
                    return Route("none", keep)
                if n_kept == B:
                    return Route("all", keep, sel_ok=keep)
            return Route("masked", keep, sel_ok=keep, all_ok=False, prob=prob)
        pri = prob.detach()
        if st.nested and st.prev_keep is not None:
            pri = pri + 2.0 * st.prev_keep.to(pri.dtype)
        if st.router.keep_sink:
            n_before = (seq.n_valid - valid_new.sum(1))[:, None]
            first = valid_new & (n_before + valid_new.long().cumsum(1) == 1)
            pri = torch.where(first, torch.full_like(pri, 4.0), pri)
        k_rows = [keep_count(int(n), keep_frac) for n in st.n_new_host]
        Tq = max(k_rows)
        p = torch.where(valid_new, pri.float(), torch.full((), -float("inf"), device=pri.device))
        k = keep_counts(valid_new.sum(1), keep_frac)  # the same counts, computed on the device (no copy)
        keep = (torch_rank(p) < k[:, None]) & valid_new
        if st.training:
            static = keep_topk(StaticRouter().keep_prob(inputs), valid_new, keep=keep_frac)
            return Route("select", keep, prob=prob, static=static)
        if Tq == 0:
            return Route("none", keep, prob=prob)
        all_ok = min(k_rows) == Tq
        if all_ok and Tq == T:
            return Route("all", keep, sel_ok=keep, prob=prob)
        sel = torch_top_k(p, Tq)
        return Route("select", keep, sel_idx=sel, sel_ok=keep.gather(1, sel), all_ok=all_ok, prob=prob)

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
        route = self._decide(seq, hidden_states, valid_new)
        st.prev_keep = route.keep
        lay.seen = past + T
        self._count(route.keep, route.kind == "all")
        if st.record:
            st.decisions[self.layer_idx].append(route.keep.detach())
        if st.training:
            return self._forward_train(seq, lay, hidden_states, kw, route, valid_new)
        if route.kind == "none":
            lay.complete = False
            return hidden_states
        if route.kind == "all" and lay.complete:
            # the model's own arguments: this layer's cache holds every slot, in order
            slots = st.new_slots
            lay.pending = (slots, valid_new)
            lay.holes = lay.holes or not st.new_all_valid
            out = self._call(hidden_states, kw)
            self._update_scores(seq, lay, kw.get("position_embeddings"), slots, valid_new, st.new_all_valid)
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
        out = self._call(h, kw)
        if not route.all_ok:
            out = torch.where(ok[..., None], out, h)
        if sel is not None:
            out = hidden.scatter(1, sel[..., None].expand(B, Tq, H), out.to(hidden.dtype))
        self._update_scores(seq, lay, kw.get("position_embeddings"), q_slot, ok, route.all_ok)
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

    def _call(self, h, kw):
        self._capture = self.state.compute_scores and self.state.router.needs_scores
        try:
            return self.layer(h, **kw)
        finally:
            self._capture = False

    # ------------------------------------------------------------------ training
    def _forward_train(self, seq, lay, hidden, kw, route, valid_new):
        """Differentiable routing: all tokens run with kept-only keys; straight-through gate."""
        st, i = self.state, self.layer_idx
        B, T, _ = hidden.shape
        if st.past:
            raise ValueError("FTP training mode does not take a filled KV cache")
        keep, prob = route.keep, route.prob
        ar = torch.arange(T, device=hidden.device)
        causal = ar[None, :] <= ar[:, None]
        if self.window is not None:
            causal = causal & (ar[None, :] > ar[:, None] - self.window)
        allowed = (keep[:, None, :] & causal[None]) | torch.eye(T, dtype=torch.bool, device=hidden.device)[None]
        mask = torch.zeros(allowed.shape, dtype=hidden.dtype, device=hidden.device)
        mask.masked_fill_(~allowed, torch.finfo(hidden.dtype).min)
        kw["attention_mask"] = mask[:, None]
        lay.complete = False
        lay.pending = (ar.expand(B, T), keep)
        out_full = self._call(hidden, kw)
        if prob is None:
            gate = keep.to(hidden.dtype)
        else:
            gate = keep.to(prob.dtype) + prob - prob.detach()
            st.probs[i], st.static_keeps[i] = prob, route.static
        st.keeps[i], st.train_valid[i] = keep, valid_new
        out = hidden + gate[..., None].to(hidden.dtype) * (out_full - hidden)
        self._update_scores(seq, lay, kw.get("position_embeddings"), ar.expand(B, T), keep, False)
        return out

    # ------------------------------------------------------------------ score feature
    @torch.no_grad()
    def _update_scores(self, seq: FTPCache, lay: CompactLayer, pe, q_slot, q_ok, all_ok: bool) -> None:
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


# ----------------------------------------------------------------------------------------------
# attach / detach
# ----------------------------------------------------------------------------------------------
class FTPHandle:
    """Result of :func:`attach_ftp`: a context manager (yields the model) and a control panel."""

    def __init__(self, model, base, layers, originals, wrappers, state, hooks):
        self.model, self.base, self.layers = model, base, layers
        self.originals, self.wrappers, self.state = originals, wrappers, state
        self._hooks = hooks
        self.attached = True
        self.flops_per_token = [layer_linear_flops(m) for m in originals]

    # context manager -------------------------------------------------
    def __enter__(self):
        return self.model

    def __exit__(self, *exc):
        self.detach()
        return False

    def detach(self) -> None:
        """Put the original decoder layer modules back and remove every hook."""
        if not self.attached:
            return
        for i, orig in enumerate(self.originals):
            self.wrappers[i].remove_hooks()
            self.layers[i] = orig
        for h in self._hooks:
            h.remove()
        self.attached = False
        _HANDLES.pop(self.model, None)

    # controls --------------------------------------------------------
    def set_schedule(self, schedule=None, *, keep=None, allow_full: bool = False) -> None:
        """New per-block budgets: ``keep=`` fractions or their alias ``schedule`` (sparsities)."""
        self.state.schedule, self.state.keep = block_budgets(
            schedule, len(self.originals), keep=keep, allow_full=allow_full
        )
        self.state.reset_stats()

    def set_router(self, router: Router) -> None:
        check_router(router)
        self.state.router = router

    def set_stop_tokens(self, token_ids) -> None:
        """Decode statistics stop counting a row once it fed one of ``token_ids`` (its EOS).

        ``None`` counts every routed token (the compute actually spent).
        """
        ids = None if token_ids is None else torch.as_tensor(token_ids, dtype=torch.long).reshape(-1)
        self.state.stop_ids = ids

    @contextlib.contextmanager
    def paused(self):
        """Run the dense model while attached (e.g. a teacher pass)."""
        old = self.state.active
        self.state.active = False
        try:
            yield self.model
        finally:
            self.state.active = old

    @contextlib.contextmanager
    def recording(self):
        """Record every routing decision; read them with :meth:`decisions`."""
        self.state.reset_decisions()
        self.state.record = True
        try:
            yield self
        finally:
            self.state.record = False

    def decisions(self) -> list[torch.Tensor]:
        """Per layer, the recorded decisions of all calls concatenated: (B, S) bool on the CPU."""
        return [torch.cat(d, dim=1).cpu() if d else torch.zeros(0, 0, dtype=torch.bool) for d in self.state.decisions]

    @contextlib.contextmanager
    def forced(self, decisions):
        """Replay decisions (per layer (B, S) bool over the whole sequence) instead of routing."""
        if len(decisions) != len(self.originals):
            raise ValueError(f"got decisions for {len(decisions)} layers, model has {len(self.originals)}")
        self.state.forced = [torch.as_tensor(d, dtype=torch.bool) for d in decisions]
        try:
            yield self
        finally:
            self.state.forced = None

    def reset_stats(self) -> None:
        self.state.reset_stats()

    def _phase(self, kept: list[int], total: list[int]) -> dict:
        flops = self.flops_per_token
        sp = [1.0 - k / t if t else 0.0 for k, t in zip(kept, total)]
        dense = sum(t * f for t, f in zip(total, flops))
        saved = sum((t - k) * f for k, t, f in zip(kept, total, flops))
        return {
            "sparsity_per_block": sp,
            "mean_sparsity": sum(t - k for k, t in zip(kept, total)) / max(sum(total), 1),
            "tokens": max(total, default=0),
            "tokens_in_per_block": total,
            "tokens_kept_per_block": kept,
            "layer_flops_dense": dense,
            "layer_flops_saved": saved,
            "flops_saved_frac": saved / dense if dense else 0.0,
        }

    def stats(self) -> TokenStats:
        """Routing counts since the last reset, as one :class:`~tokenprune.stats.TokenStats`.

        Reads the device counters once. ``tokens_in``/``tokens_kept``: token-block pairs routed /
        computed (summed over blocks and phases); ``forward_passes``: base-model forward calls.
        ``extras``: ``sparsity_per_block``, ``mean_sparsity``, ``target_per_block``,
        ``keep_per_block``, ``tokens_in_per_block``, ``tokens_kept_per_block``, the FLOPs of the
        decoder layers' linear maps (``layer_flops_dense``, ``layer_flops_saved``,
        ``flops_saved_frac``), and the same per phase under ``"prefill"`` and ``"decode"``
        (a decode step is a call of one new token per row against a cache).
        """
        st = self.state
        n = len(st.schedule)
        total_p, total_d = ([int(st.tokens[p])] * n for p in (PREFILL, DECODE))
        kept_p, kept_d = (st.kept[p].tolist() for p in (PREFILL, DECODE))
        kept = [a + b for a, b in zip(kept_p, kept_d)]
        total = [a + b for a, b in zip(total_p, total_d)]
        extras = self._phase(kept, total) | {
            "target_per_block": list(st.schedule),
            "keep_per_block": list(st.keep),
            "prefill": self._phase(kept_p, total_p),
            "decode": self._phase(kept_d, total_d),
        }
        extras.pop("tokens")
        return TokenStats("ftp", sum(total), sum(kept), st.forward_passes, extras)


def check_router(router) -> None:
    """Raise a TypeError unless ``router`` is a :class:`~tokenprune.ftp.router.Router`."""
    if not isinstance(router, Router):
        raise TypeError(f"router must be a TokenRouter, StaticRouter or RandomRouter, got {type(router).__name__}")


def _base_pre_hook(state: FTPState, n_layers: int, cache_arg: str):
    def hook(module, args, kwargs):
        state.cache = None
        if not state.active:
            return None
        ids = kwargs.get("input_ids", args[0] if args else None)
        emb = kwargs.get("inputs_embeds")
        x = ids if ids is not None else emb
        if x is None:
            raise ValueError("FTP needs input_ids or inputs_embeds")
        B, T = x.shape[0], x.shape[1]
        given_key = next((k for k in ("cache", "past_key_values") if kwargs.get(k) is not None), None)
        given = kwargs.get(given_key) if given_key else None
        am = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        own = None if given is None or isinstance(given, FTPCache) else given  # the caller's own cache
        if own is not None:
            given = stand_in_for(state.stand_ins, own, am, T)
        past = given.get_seq_length() if given is not None else 0
        routed = isinstance(given, FTPCache) or not state.dense_schedule()
        if routed and past and not isinstance(given, FTPCache):
            raise ValueError("FTP was attached after the cache was filled; attach before the prefill")
        if am is not None:
            if am.ndim != 2:
                raise ValueError(f"FTP needs a 2-D (B, S) attention_mask, got shape {tuple(am.shape)}")
            if am.shape[1] != past + T:
                raise ValueError(f"attention_mask covers {am.shape[1]} tokens, expected {past + T}")
            new_valid = am[:, past:].bool().to(x.device)
        else:
            new_valid = torch.ones(B, T, dtype=torch.bool, device=x.device)
        state.forward_passes += 1
        state.prev_keep = None
        state.host_cheap = reads_are_free(x.device)
        stop = None
        if state.stop_ids is not None and ids is not None and past:
            stop = torch.isin(ids, state.stop_ids.to(ids.device)).any(1)
        phase = DECODE if past and T == 1 else PREFILL
        if not routed:  # the plain model runs (all-zero schedule); count its tokens
            if not past or state.dense_alive is None:
                state.dense_alive = torch.ones(B, dtype=torch.bool, device=x.device)
            elif stop is not None:
                state.dense_alive = state.dense_alive & ~stop
            counted = new_valid if state.stop_ids is None else new_valid & state.dense_alive[:, None]
            state.begin_call(counted, phase, all_layers=True)
            return None
        seq = given if isinstance(given, FTPCache) else FTPCache(n_layers)
        if own is not None and given is own:
            adopt(state.stand_ins, own, seq)
        if past == 0 or T > 1 or state.host_cheap:
            state.n_new_host = new_valid.sum(1).tolist()
            state.new_all_valid = all(n == T for n in state.n_new_host)
        else:  # a GPU decode step: no read-back; generate appends valid tokens
            state.n_new_host, state.new_all_valid = None, True
        seq.append_tokens(new_valid)
        if stop is not None:
            seq.alive = seq.alive & ~stop
        state.begin_call(new_valid if state.stop_ids is None else new_valid & seq.alive[:, None], phase, False)
        state.past, state.cache = past, seq
        state.new_slots = (past + torch.arange(T, device=x.device)).expand(B, T)
        if isinstance(state.router, RandomRouter) and past == 0:
            state.router.reset()
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = getattr(getattr(module, "config", None), "use_cache", True)
        if use_cache or given is not None:
            kwargs = dict(kwargs)
            kwargs.pop("past_key_values", None)
            kwargs.pop("cache", None)
            kwargs[cache_arg] = seq
            return args, kwargs
        return None

    return hook


def _base_post_hook(state: FTPState):
    def hook(module, args, kwargs, output):
        state.cache = None  # the routing state lives on in the returned cache, if any
        state.end_call()
        return None

    return hook


def attach_ftp(
    model: nn.Module,
    router: Router,
    schedule=None,
    *,
    keep=None,
    allow_full: bool = False,
    compute_scores: bool = True,
    nested: bool = False,
) -> FTPHandle:
    """Swap the decoder layers of ``model`` for routed wrappers.

    Args:
        model: a transformers ``*ForCausalLM`` (or base model) with ``model.model.layers``.
        router: :class:`TokenRouter`, :class:`StaticRouter` or :class:`RandomRouter`.
        schedule: per-layer target sparsity, the documented alias of ``keep`` (``keep = 1 -
            sparsity``): a float for uniform, or ``n_layers`` floats in [0, 1).
        keep: per-layer fraction of tokens each block computes (float or ``n_layers`` floats in
            (0, 1]); each row keeps ``floor(keep * n_valid + 0.5)`` tokens in a prefill. Give
            ``keep`` or ``schedule``, not both.
        allow_full: accept sparsity 1.0 (the block is skipped by every token).
        compute_scores: compute the attention-score factor (needed by :class:`TokenRouter`).
        nested: no re-entry (not in the paper; default off = the paper's independent per-block
            decisions). In a prefill, tokens the previous block computed outrank every token it
            skipped, so a token that skipped a block comes back only when the next block keeps
            more tokens than the previous one did. A token re-entering after skipped blocks
            carries hidden states those later blocks never see in the dense model; see
            ``docs/ftp.md`` for the measured effect.
    Returns:
        :class:`FTPHandle`; use ``with attach_ftp(...) as model:`` to detach on exit.
    """
    check_router(router)
    if model in _HANDLES:
        raise ValueError("FTP is already attached to this model; detach it first")
    base, layers = find_decoder(model)
    sched, keeps = block_budgets(schedule, len(layers), keep=keep, allow_full=allow_full)
    cfg = getattr(model, "config", None)
    impl = getattr(cfg, "_attn_implementation", "eager") or "eager"
    if impl not in _SUPPORTED_ATTN:
        raise ValueError(f"FTP supports attn_implementation in {_SUPPORTED_ATTN}, the model uses {impl!r}")
    state = FTPState(router=router, schedule=sched, keep=keeps, compute_scores=compute_scores, nested=nested)
    state.reset_stats()
    state.reset_decisions()
    state.clear_train()
    originals = list(layers)
    wrappers = []
    try:
        for i, layer in enumerate(originals):
            wrappers.append(RoutedLayer(layer, i, state))
    except Exception:
        for w in wrappers:
            w.remove_hooks()
        raise
    for i, w in enumerate(wrappers):
        layers[i] = w
    cache_arg = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
    hooks = [
        base.register_forward_pre_hook(_base_pre_hook(state, len(layers), cache_arg), with_kwargs=True),
        base.register_forward_hook(_base_post_hook(state), with_kwargs=True),
    ]
    handle = FTPHandle(model, base, layers, originals, wrappers, state, hooks)
    _HANDLES[model] = handle
    return handle


def detach_ftp(model: nn.Module) -> None:
    """Restore the original decoder layers of a model FTP was attached to (no-op otherwise)."""
    handle = _HANDLES.get(model)
    if handle is not None:
        handle.detach()


def get_handle(model: nn.Module) -> FTPHandle | None:
    """The :class:`FTPHandle` attached to ``model``, or None."""
    return _HANDLES.get(model)


@contextlib.contextmanager
def ftp_routing(model: nn.Module, router: Router, schedule=None, **kwargs):
    """``with ftp_routing(model, router, keep=...) as handle:`` — attach, yield the handle, detach."""
    handle = attach_ftp(model, router, schedule, **kwargs)
    try:
        yield handle
    finally:
        handle.detach()
