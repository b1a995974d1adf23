"""Routed decoder layers for transformers decoder-only LLMs (Llama, Qwen2, Mistral-style).

``attach_ftp(model, router, schedule)`` swaps each ``model.model.layers[i]`` instance for a
:class:`RoutedLayer` wrapper (no transformers class is patched; :func:`detach_ftp` or leaving
the ``with`` block puts the original modules back).

What a routed layer does in one forward call (hidden states ``(B, T, H)``):

1. the router gives a keep probability per token (:mod:`tokenprune.ftp.router`); prefill keeps
   the top ``floor(keep_l * n_valid + 0.5)`` tokens of each row (``keep_l = 1 - s_l``), a decode step (one new token per
   row against a cache) keeps the token when ``router.decode_keep`` says so;
2. the kept tokens are gathered per row (padded to the largest kept count; no padding when
   ``B == 1``) and the ORIGINAL decoder layer runs on that subsequence with their original
   rotary embeddings / position ids and an explicit attention mask (kept tokens attend only
   to kept tokens, causally, by their original slots);
3. the outputs are scattered back; skipped tokens pass the block unchanged (identity).

KV cache: the layer's attention talks to a small proxy cache. New K/V of the kept tokens are
scattered into a full-length ``(B, H_kv, T, D)`` block (zeros for skipped and padding tokens)
before the real cache is updated, so every layer's cache keeps the true sequence length
(``get_seq_length``, position ids and ``generate`` bookkeeping stay correct), and a per-layer
validity mask records which cached slots hold real K/V. Attention then only ever reads the
valid slots (gathered per row), so a skipped token's K/V are never attended to.

Padding (2-D ``attention_mask`` with zeros) is read by a pre-hook on the base model; padding
tokens are never routed into a block.

Exactness: when a layer keeps every valid token and its cache has no holes, the original
layer is called with the original arguments (so sparsity 0 gives bit-identical logits).

Mistral-style sliding windows (``config.sliding_window``) are applied in the masks, also
with the sliding-window cache (it returns only the last slots; the gather accounts for the
offset). Not supported
(clear error at attach): per-layer sliding-window layers (Qwen2 ``use_sliding_window``),
attention implementations other than ``sdpa``/``eager``. Partial rotary embeddings are not
supported.
"""

from __future__ import annotations

import contextlib
import inspect
import weakref
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from prunecore.budget import torch_rank
from tokenprune.stats import TokenStats

from .cache import ProxyCache
from .router import RandomRouter, RouteInputs, Router, StaticRouter, keep_topk, normalised_positions, score_ranks
from .schedule import sparsity_schedule

_HANDLES: weakref.WeakKeyDictionary[nn.Module, FTPHandle] = weakref.WeakKeyDictionary()
_SUPPORTED_ATTN = ("sdpa", "eager")


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


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _bool_rows(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of True entries per row, padded. (B, T) bool -> idx (B, K) long, ok (B, K) bool."""
    counts = mask.sum(1)
    k = int(counts.max()) if mask.numel() else 0
    order = torch.sort(torch_rank(mask.to(torch.uint8)), dim=1).indices[:, :k]
    ok = torch.arange(k, device=mask.device)[None, :] < counts[:, None]
    return order, ok


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
    """State shared by the routed layers of one model (one sequence batch at a time)."""

    router: Router
    schedule: list  # per block target sparsity (router feature)
    keep: list  # per block keep fraction (budget), 1 - schedule
    active: bool = True
    training: bool = False
    compute_scores: bool = True
    nested: bool = False  # no re-entry: prefer tokens the previous block computed
    prev_keep: torch.Tensor | None = None  # (B, T) decisions of the previous block in this call
    # per sequence (reset when a forward starts without a filled cache)
    valid: torch.Tensor | None = None  # (B, S) bool, False on padding
    score: torch.Tensor | None = None  # (B, S) float, latest attention-score feature
    n_past: int = 0
    n_new: int = 0
    decode: bool = False
    # decisions
    forced: list | None = None  # per layer (B, S_total) bool
    record: bool = False
    decisions: list = field(default_factory=list)
    # statistics
    kept: list = field(default_factory=list)
    total: list = field(default_factory=list)
    forward_passes: int = 0
    # training buffers (per layer)
    probs: list = field(default_factory=list)
    keeps: list = field(default_factory=list)
    static_keeps: list = field(default_factory=list)
    train_valid: list = field(default_factory=list)

    def reset_stats(self) -> None:
        n = len(self.schedule)
        self.kept = [0] * n
        self.total = [0] * n
        self.forward_passes = 0

    def reset_decisions(self) -> None:
        self.decisions = [[] for _ in self.schedule]

    def clear_train(self) -> None:
        n = len(self.schedule)
        self.probs, self.keeps = [None] * n, [None] * n
        self.static_keeps, self.train_valid = [None] * n, [None] * n


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
                f"decoder layer {layer_idx} uses sliding-window attention; FTP supports full attention only"
            )
        # Mistral-style: the window lives in the config and applies to every layer
        self.window = None if hasattr(attn, "sliding_window") else getattr(attn.config, "sliding_window", None)
        self._attn = attn
        self.head_dim = int(attn.head_dim)
        cfg = attn.config
        self.n_heads = int(cfg.num_attention_heads)
        self.n_kv = int(cfg.num_key_value_heads)
        self.scaling = float(getattr(attn, "scaling", self.head_dim**-0.5))
        self.kv_valid: torch.Tensor | None = None  # (B, S) bool: cache slot holds real K/V
        self._q = None
        self._capture = False
        src = attn.q_norm if hasattr(attn, "q_norm") else attn.q_proj
        self._hook = src.register_forward_hook(self._q_hook)
        self._sig = inspect.signature(layer.forward)

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

    # ------------------------------------------------------------------
    def _decide(self, hidden: torch.Tensor, valid_new: torch.Tensor):
        """keep (B, T) bool, prob (B, T) or None, static keep or None."""
        st, i = self.state, self.layer_idx
        s = st.schedule[i]
        past, T = st.n_past, hidden.shape[1]
        if st.forced is not None:
            f = st.forced[i]
            if f.shape[1] < past + T:
                raise ValueError(f"forced decisions for layer {i} cover {f.shape[1]} tokens, need {past + T}")
            return f[:, past : past + T].to(valid_new.device) & valid_new, None, None
        if s >= 1.0:
            return torch.zeros_like(valid_new), None, None
        if s == 0.0 and not st.training:
            return valid_new.clone(), None, None
        pos = normalised_positions(st.valid)[:, past:]
        inputs = RouteInputs(
            position=pos.to(hidden.device),
            score=st.score[:, past:].to(hidden.device),
            rank=score_ranks(st.score, st.valid)[:, past:].to(hidden.device),
            sparsity=s,
            valid=valid_new,
            decode=st.decode,
        )
        prob = st.router.keep_prob(inputs)
        if st.decode:
            keep = st.router.decode_keep(prob, inputs)
        else:
            pri = prob.detach()
            if st.nested and st.prev_keep is not None:
                pri = pri + 2.0 * st.prev_keep.to(pri.dtype)
            if getattr(st.router, "keep_sink", False):
                first = valid_new & (st.valid.long().cumsum(1)[:, past:] == 1)
                pri = torch.where(first, torch.full_like(pri, 4.0), pri)
            keep = keep_topk(pri, valid_new, keep=st.keep[i])
        static = None
        if st.training:
            static = keep_topk(StaticRouter().keep_prob(inputs), valid_new, keep=st.keep[i])
        return keep, prob, static

    def _bind(self, args, kwargs) -> dict:
        if not args:
            return dict(kwargs)
        bound = self._sig.bind_partial(None, *args, **kwargs)
        out = dict(bound.arguments)
        out.pop(next(iter(self._sig.parameters)))
        extra = out.pop("kwargs", None)
        if extra:
            out.update(extra)
        return out

    def forward(self, hidden_states, *args, **kwargs):
        st = self.state
        if not st.active or st.valid is None:
            return self.layer(hidden_states, *args, **kwargs)
        kw = self._bind(args, kwargs)
        ckey = "past_key_values" if "past_key_values" in kw else "cache"
        cache = kw.get(ckey)
        B, T, _ = hidden_states.shape
        past = st.n_past
        if st.valid.shape != (B, past + T):
            raise ValueError(
                f"FTP state holds {tuple(st.valid.shape)} tokens but layer {self.layer_idx} "
                f"got hidden states {tuple(hidden_states.shape)} after {past} cached tokens"
            )
        valid_new = st.valid[:, past:]
        if cache is None or past == 0 or self.kv_valid is None or self.kv_valid.shape != (B, past):
            self.kv_valid = torch.zeros(B, 0, dtype=torch.bool, device=hidden_states.device)
            if cache is not None and past > 0:
                raise ValueError("routed layer lost track of its cache: attach FTP before the prefill")
        keep, prob, static = self._decide(hidden_states, valid_new)
        keep = keep.to(hidden_states.device)
        st.prev_keep = keep
        holes = bool((st.valid[:, :past] & ~self.kv_valid).any()) if past else False
        self.kv_valid = torch.cat([self.kv_valid, keep], dim=1)
        i = self.layer_idx
        st.kept[i] += int(keep.sum())
        st.total[i] += int(valid_new.sum())
        if st.record:
            st.decisions[i].append(keep.detach().cpu())
        want_scores = st.compute_scores and st.router.needs_scores

        if st.training:
            return self._forward_train(hidden_states, kw, ckey, keep, prob, static, valid_new)

        if bool(torch.equal(keep, valid_new)) and not holes:
            # exact path: the original call (padding tokens computed as in the dense model)
            if not want_scores:
                return self.layer(hidden_states, *args, **kwargs)
            proxy = ProxyCache(cache, T=T)
            kw[ckey] = proxy
            out = self._call(hidden_states, kw)
            self._update_scores(kw, torch.arange(T, device=keep.device).expand(B, T), keep, proxy, key_slots=None)
            return out

        q_idx, q_ok = _bool_rows(keep)
        Tq = q_idx.shape[1]
        if Tq == 0:  # nobody computed in any row: identity, zero K/V for the cache bookkeeping
            if cache is not None:
                z = hidden_states.new_zeros(B, self.n_kv, T, self.head_dim)
                cache.update(z, z.clone(), self.layer_idx)
            return hidden_states
        key_valid = torch.cat([self.kv_valid[:, :past], keep], dim=1)  # (B, S)
        k_idx, k_ok = _bool_rows(key_valid)  # (B, K)
        if past == 0 and self.window is None and self._sdpa() and bool(q_ok.all()):
            # fresh prefill, no padding: the keys are exactly the gathered queries, in order, so
            # the explicit mask is plain causal -> let sdpa use its causal kernel
            kw["attention_mask"] = None
        else:
            kw["attention_mask"] = self._gathered_mask(q_idx + past, q_ok, k_idx, k_ok, hidden_states.dtype)
        h = hidden_states.new_zeros(B, Tq, hidden_states.shape[-1])
        h[q_ok] = hidden_states[keep]
        pe = kw.get("position_embeddings")
        if pe is not None:
            cos, sin = (t.expand(B, *t.shape[1:]) for t in pe)
            cg = cos.new_zeros(B, Tq, cos.shape[-1])
            cg[q_ok] = cos[keep]
            sg = sin.new_zeros(B, Tq, sin.shape[-1])
            sg[q_ok] = sin[keep]
            kw["position_embeddings"] = (cg, sg)
        pid = kw.get("position_ids")
        if pid is not None:
            pid = pid.expand(B, T)
            pg = pid.new_zeros(B, Tq)
            pg[q_ok] = pid[keep]
            kw["position_ids"] = pg
        if "cache_position" in kw and kw["cache_position"] is not None:
            pass  # the real cache is updated with all T slots, so cache_position stays valid
        proxy = ProxyCache(cache, T=T, S_total=past + T, q_keep=keep, q_ok=q_ok, k_idx=k_idx)
        kw[ckey] = proxy
        out_g = self._call(h, kw)
        out = hidden_states.clone()
        out[keep] = out_g[q_ok].to(out.dtype)
        if want_scores:
            self._update_scores(kw, q_idx, q_ok, proxy, key_slots=(k_idx, k_ok))
        return out

    def _sdpa(self) -> bool:
        return getattr(self._attn.config, "_attn_implementation", None) == "sdpa"

    def _gathered_mask(self, q_slot, q_ok, k_idx, k_ok, dtype) -> torch.Tensor:
        """Additive mask (B, 1, Tq, K): a kept query sees kept keys at slots <= its own slot.

        q_slot: (B, Tq) slots of the gathered queries; q_ok: (B, Tq) real (not padding) rows;
        k_idx/k_ok: (B, K) slots of the gathered keys and which of them are real.
        """
        allowed = k_ok[:, None, :] & (k_idx[:, None, :] <= q_slot[:, :, None])
        if self.window is not None:
            allowed &= k_idx[:, None, :] > q_slot[:, :, None] - self.window
        allowed[:, :, 0] |= ~q_ok  # padded rows: no NaN
        mask = torch.zeros(allowed.shape, dtype=dtype, device=q_slot.device)
        mask.masked_fill_(~allowed, torch.finfo(dtype).min)
        return mask[:, None]

    def _call(self, h, kw):
        self._capture = self.state.compute_scores and self.state.router.needs_scores
        try:
            return self.layer(h, **kw)
        finally:
            self._capture = False

    # ------------------------------------------------------------------
    def _forward_train(self, hidden, kw, ckey, keep, prob, static, valid_new):
        """Differentiable routing: all tokens run with kept-only keys; straight-through gate."""
        st, i = self.state, self.layer_idx
        B, T, _ = hidden.shape
        if kw.get(ckey) is not None and st.n_past:
            raise ValueError("FTP training mode does not take a filled KV cache")
        ar = torch.arange(T, device=hidden.device)
        causal = ar[None, :] <= ar[:, None]
        if self.window is not None:
            causal = causal & (ar[None, :] > ar[:, None] - self.window)
        allowed = (keep[:, None, :] & causal[None]) | torch.eye(T, dtype=torch.bool, device=hidden.device)[None]
        mask = torch.zeros(allowed.shape, dtype=hidden.dtype, device=hidden.device)
        mask.masked_fill_(~allowed, torch.finfo(hidden.dtype).min)
        kw["attention_mask"] = mask[:, None]
        proxy = ProxyCache(None, T=T)
        kw[ckey] = proxy
        out_full = self._call(hidden, kw)
        if prob is None:
            gate = keep.to(hidden.dtype)
        else:
            gate = keep.to(prob.dtype) + prob - prob.detach()
            st.probs[i], st.static_keeps[i] = prob, static
        st.keeps[i], st.train_valid[i] = keep, valid_new
        out = hidden + gate[..., None].to(hidden.dtype) * (out_full - hidden)
        if st.compute_scores and st.router.needs_scores:
            with torch.no_grad():
                self._update_scores(kw, ar.expand(B, T), keep, proxy, key_slots=None, key_valid=keep)
        return out

    @torch.no_grad()
    def _update_scores(self, kw, q_idx, q_ok, proxy, *, key_slots, key_valid=None):
        """Attention of the last computed token of each row to the keys it may see -> state.score.

        q_idx: (B, Tq) slots (in the current call) of the query rows the layer ran on;
        q_ok: (B, Tq) bool, which of those rows are real computed tokens (kept, not padding).
        key_slots: (k_idx, k_ok) of the keys returned by the proxy, or None when the proxy
        returned every slot ``0..S-1`` (then ``key_valid`` (B, T) or the state decides validity).
        """
        st = self.state
        q = self._q
        self._q = None
        if q is None or proxy.keys is None:
            return
        B, Tq = q_idx.shape
        self._T_call = st.valid.shape[1] - st.n_past
        has = q_ok.any(1)
        last = (Tq - 1) - q_ok.flip(1).to(torch.uint8).argmax(1)  # (B,) last computed row
        rows = torch.arange(B, device=q.device)
        q_last = q.reshape(B, q.shape[1], -1, self.head_dim)[rows, last]  # (B, H, D) pre-rope
        if q_last.shape[1] != self.n_heads:
            return
        pe = kw.get("position_embeddings")
        if pe is not None:
            cos, sin = (t.expand(B, *t.shape[1:]) for t in pe)
            c, s = cos[rows, last][:, None, :], sin[rows, last][:, None, :]
            if c.shape[-1] == self.head_dim:
                q_last = q_last * c + _rotate_half(q_last) * s
        keys = proxy.keys  # (B, Hkv, K, D)
        if keys.shape[1] != self.n_heads:
            keys = keys.repeat_interleave(self.n_heads // keys.shape[1], dim=1)
        logits = torch.einsum("bhd,bhkd->bhk", q_last.float(), keys.float()) * self.scaling
        past = st.n_past
        q_slot = past + q_idx[rows, last]  # (B,)
        if key_slots is None:
            S = keys.shape[2]
            slots = (torch.arange(S, device=q.device) + (past + self._T_call - S)).expand(B, S)
            if key_valid is not None:
                kv = torch.cat([self.kv_valid[:, :past], key_valid], 1)[:, -S:] if past else key_valid
            else:
                kv = self.kv_valid[:, -S:]
            ok = kv.clone()
        else:
            slots, ok = key_slots
            ok = ok.clone()
        ok &= slots <= q_slot[:, None]
        if self.window is not None:
            ok &= slots > q_slot[:, None] - self.window
        ok &= has[:, None]
        logits = logits.masked_fill(~ok[:, None, :], -float("inf"))
        a = torch.softmax(logits, dim=-1).nan_to_num(0.0).mean(1)  # (B, K)
        n = ok.sum(1, keepdim=True).clamp_min(1)
        feat = torch.log1p(a * n)
        st.score[rows[:, None].expand_as(slots)[ok], slots[ok]] = feat[ok].to(st.score.dtype)


# ----------------------------------------------------------------------------------------------
# attach / detach
# ----------------------------------------------------------------------------------------------
class FTPHandle:
    """Result of :func:`attach_ftp`: a context manager (yields the model) and a control panel."""

    def __init__(self, model, base, layers, originals, wrappers, state, hook):
        self.model, self.base, self.layers = model, base, layers
        self.originals, self.wrappers, self.state = originals, wrappers, state
        self._hook = hook
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
        self._hook.remove()
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
        _check_router(router)
        self.state.router = router

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
        """Per layer, the recorded decisions of all calls concatenated: (B, S) bool."""
        return [torch.cat(d, dim=1) if d else torch.zeros(0, 0, dtype=torch.bool) for d in self.state.decisions]

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

    def stats(self) -> TokenStats:
        """Routing counts since the last reset, as one :class:`~tokenprune.stats.TokenStats`.

        ``tokens_in``/``tokens_kept``: token-block pairs routed / computed (summed over blocks);
        ``forward_passes``: base-model forward calls. ``extras``: ``sparsity_per_block``,
        ``mean_sparsity``, ``target_per_block``, ``keep_per_block``, ``tokens_in_per_block``,
        ``tokens_kept_per_block`` and the FLOPs of the decoder layers' linear maps
        (``layer_flops_dense``, ``layer_flops_saved``, ``flops_saved_frac``).
        """
        st = self.state
        kept, total = [int(k) for k in st.kept], [int(t) for t in st.total]
        sp = [1.0 - k / t if t else 0.0 for k, t in zip(kept, total)]
        dense = sum(t * f for t, f in zip(total, self.flops_per_token))
        saved = sum((t - k) * f for k, t, f in zip(kept, total, self.flops_per_token))
        extras = {
            "sparsity_per_block": sp,
            "mean_sparsity": sum(t - k for k, t in zip(kept, total)) / max(sum(total), 1),
            "target_per_block": list(st.schedule),
            "keep_per_block": list(st.keep),
            "tokens_in_per_block": total,
            "tokens_kept_per_block": kept,
            "layer_flops_dense": dense,
            "layer_flops_saved": saved,
            "flops_saved_frac": saved / dense if dense else 0.0,
        }
        return TokenStats("ftp", sum(total), sum(kept), st.forward_passes, extras)


def _check_router(router) -> None:
    if not isinstance(router, Router):
        raise TypeError(f"router must be a TokenRouter, StaticRouter or RandomRouter, got {type(router).__name__}")


def _base_pre_hook(state: FTPState, wrappers):
    def hook(module, args, kwargs):
        if not state.active:
            return None
        ids = kwargs.get("input_ids", args[0] if args else None)
        emb = kwargs.get("inputs_embeds")
        x = ids if ids is not None else emb
        if x is None:
            raise ValueError("FTP needs input_ids or inputs_embeds")
        B, T = x.shape[0], x.shape[1]
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        past = int(cache.get_seq_length()) if cache is not None else 0
        am = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        if am is not None:
            if am.ndim != 2:
                raise ValueError(f"FTP needs a 2-D (B, S) attention_mask, got shape {tuple(am.shape)}")
            if am.shape[1] != past + T:
                raise ValueError(f"attention_mask covers {am.shape[1]} tokens, expected {past + T}")
            new_valid = am[:, past:].bool().to(x.device)
        else:
            new_valid = torch.ones(B, T, dtype=torch.bool, device=x.device)
        if past == 0 or state.valid is None or state.valid.shape != (B, past):
            if past:
                raise ValueError("FTP was attached after the cache was filled; attach before the prefill")
            state.valid = new_valid
            state.score = torch.zeros(B, T, dtype=torch.float32, device=x.device)
        else:
            state.valid = torch.cat([state.valid, new_valid], 1)
            state.score = torch.cat([state.score, torch.zeros(B, T, dtype=torch.float32, device=x.device)], 1)
        state.n_past, state.n_new = past, T
        state.forward_passes += 1
        state.decode = past > 0 and T == 1
        state.prev_keep = None
        if isinstance(state.router, RandomRouter) and past == 0:
            state.router.reset()
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
    _check_router(router)
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
    hook = base.register_forward_pre_hook(_base_pre_hook(state, wrappers), with_kwargs=True)
    handle = FTPHandle(model, base, layers, originals, wrappers, state, hook)
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
