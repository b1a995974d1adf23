"""State shared by the routed layers of one model, and one layer's routing decision.

:class:`FTPState` lives as long as the attachment: the per-block budgets, the router, the
current call (set by the base model's pre-hook, :mod:`.hooks`) and the statistics, kept on
the device until :attr:`tokenprune.ftp.handle.FTPHandle.stats` reads them once.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch

from .cache import FTPCache
from .router import Router

PREFILL, DECODE = 0, 1  # statistics phases


@dataclass
class FTPState:
    """State shared by the routed layers of one model (one forward call at a time)."""

    router: Router
    schedule: list  # per block target sparsity (router feature); None for a count budget (per row)
    keep: list  # per block budget: keep fraction, or int count of each row's tokens
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
    # statistics, kept on the device and read by FTPHandle.stats: per phase (PREFILL, DECODE)
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
