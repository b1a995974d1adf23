"""Differentiable routing for router training: every token runs, kept-only keys, straight-through gate."""

from __future__ import annotations

import torch

from .cache import CompactLayer, FTPCache
from .state import Route


def forward_train(layer, seq: FTPCache, lay: CompactLayer, hidden: torch.Tensor, kw: dict, route: Route, valid_new):
    """Training forward of a :class:`~tokenprune.ftp.layer.RoutedLayer` ``layer`` on ``hidden (B, T, H)``.

    Every token runs the block, attending only to the kept tokens (and itself); the output is
    ``hidden + gate * (block(hidden) - hidden)`` with ``gate = keep + prob - prob.detach()``
    (straight-through), and the router's probabilities / decisions are stored per layer in
    the state for the losses.
    """
    st, i = layer.state, layer.layer_idx
    B, T, _ = hidden.shape
    if st.past:
        raise ValueError("FTP training mode does not take a filled KV cache")
    keep, prob = route.keep, route.prob
    ar = torch.arange(T, device=hidden.device)
    causal = ar[None, :] <= ar[:, None]
    if layer.window is not None:
        causal = causal & (ar[None, :] > ar[:, None] - layer.window)
    allowed = (keep[:, None, :] & causal[None]) | torch.eye(T, dtype=torch.bool, device=hidden.device)[None]
    mask = torch.zeros(allowed.shape, dtype=hidden.dtype, device=hidden.device)
    mask.masked_fill_(~allowed, torch.finfo(hidden.dtype).min)
    kw["attention_mask"] = mask[:, None]
    lay.complete = False
    lay.pending = (ar.expand(B, T), keep)
    out_full = layer.call_layer(hidden, kw)
    if prob is None:
        gate = keep.to(hidden.dtype)
    else:
        gate = keep.to(prob.dtype) + prob - prob.detach()
        st.probs[i], st.static_keeps[i] = prob, route.static
    st.keeps[i], st.train_valid[i] = keep, valid_new
    out = hidden + gate[..., None].to(hidden.dtype) * (out_full - hidden)
    layer.update_scores(seq, lay, kw.get("position_embeddings"), ar.expand(B, T), keep, False)
    return out
