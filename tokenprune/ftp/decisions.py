"""One routed layer's decision for one forward call: which new tokens each row computes.

Prefill: the top ``keep`` tokens of each row by router priority (the one budget rule,
:func:`prunecore.budget.keep_counts`; a fraction or an int count per row). Decode (one new
token per row against a cache): the router's ``decode_keep`` rule, without a host read on
a GPU. Replayed decisions (:meth:`tokenprune.ftp.handle.FTPHandle.forced`) bypass the router.
"""

from __future__ import annotations

import torch

from prunecore.budget import keep_count, keep_counts, torch_rank, torch_top_k

from .cache import FTPCache
from .router import RouteInputs, StaticRouter, keep_topk, normalised_positions, score_ranks
from .state import FTPState, Route


def count_sparsity(k: int, n_valid: torch.Tensor) -> torch.Tensor:
    """Router sparsity feature of a count budget: ``1 - min(k, n) / n`` per row; ``(B,)`` -> ``(B, 1)`` float."""
    n = n_valid.clamp_min(1).float()
    return (1.0 - n.clamp_max(float(k)) / n)[:, None]


def route_inputs(st: FTPState, seq: FTPCache, valid_new: torch.Tensor, s, decode: bool) -> RouteInputs:
    """Router features of the new tokens; a decode step updates them incrementally (no sort)."""
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


def route_from_mask(keep: torch.Tensor) -> Route:
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


def decide(st: FTPState, i: int, seq: FTPCache, valid_new: torch.Tensor) -> Route:
    """Layer ``i``'s route for the call's new tokens ``valid_new`` (B, T) bool."""
    s, budget = st.schedule[i], st.keep[i]
    past, (B, T) = st.past, valid_new.shape
    decode = past > 0 and T == 1
    if st.forced is not None:
        f = st.forced[i]
        if f.shape[1] < past + T:
            raise ValueError(f"forced decisions for layer {i} cover {f.shape[1]} tokens, need {past + T}")
        return route_from_mask(f[:, past : past + T].to(valid_new.device) & valid_new)
    if s is None:  # an int count per row: the router sees each row's implied sparsity
        s = count_sparsity(budget, seq.n_valid)
    elif s >= 1.0:
        return Route("none", torch.zeros_like(valid_new))
    dense = not isinstance(s, torch.Tensor) and s == 0.0
    if not st.training and (dense or (decode and st.router.decode_keeps_all)):
        return Route("all", valid_new, sel_ok=valid_new, all_ok=st.new_all_valid)
    inputs = route_inputs(st, seq, valid_new, s, decode)
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
    k_rows = [keep_count(int(n), budget, clamp=True) for n in st.n_new_host]
    Tq = max(k_rows)
    p = torch.where(valid_new, pri.float(), torch.full((), -float("inf"), device=pri.device))
    k = keep_counts(valid_new.sum(1), budget, clamp=True)  # the same counts, computed on the device (no copy)
    keep = (torch_rank(p) < k[:, None]) & valid_new
    if st.training:
        static = keep_topk(StaticRouter().keep_prob(inputs), valid_new, budget)
        return Route("select", keep, prob=prob, static=static)
    if Tq == 0:
        return Route("none", keep, prob=prob)
    all_ok = min(k_rows) == Tq
    if all_ok and Tq == T:
        return Route("all", keep, sel_ok=keep, prob=prob)
    sel = torch_top_k(p, Tq)
    return Route("select", keep, sel_idx=sel, sel_ok=keep.gather(1, sel), all_ok=all_ok, prob=prob)
