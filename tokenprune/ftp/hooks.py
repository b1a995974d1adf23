"""Forward hooks on the base model: set up each call's routing state and flush its counts.

The pre-hook reads the padding mask, swaps the caller's cache for an
:class:`~tokenprune.ftp.cache.FTPCache` at the prefill and starts the call's counting; the
post-hook adds the call's counts to the device totals.
"""

from __future__ import annotations

import torch

from .cache import FTPCache, adopt, stand_in_for
from .router import RandomRouter
from .state import DECODE, PREFILL, FTPState


def reads_are_free(device: torch.device) -> bool:
    """Whether reading a tensor value on the host costs no device synchronisation (CPU tensors)."""
    return device.type == "cpu"


def base_pre_hook(state: FTPState, n_layers: int, cache_arg: str):
    """Forward pre-hook (with kwargs) of the base model for ``n_layers`` routed layers."""

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


def base_post_hook(state: FTPState):
    """Forward hook (with kwargs) of the base model: ends the call's counting."""

    def hook(module, args, kwargs, output):
        state.cache = None  # the routing state lives on in the returned cache, if any
        state.end_call()
        return None

    return hook
