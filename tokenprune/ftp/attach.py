"""Routed decoder layers for transformers decoder-only LLMs (Llama, Qwen2, Mistral, Phi-style).

``with attach_ftp(model, router, keep) as handle:`` swaps each ``model.model.layers[i]``
instance for a :class:`~tokenprune.ftp.layer.RoutedLayer` wrapper (no transformers class is
patched; :func:`detach_ftp` or leaving the ``with`` block puts the original modules back) and
yields its :class:`~tokenprune.ftp.handle.FTPHandle` (run ``handle.model``, read
``handle.stats``).

Modules: :mod:`.budgets` (keep / sparsity per block), :mod:`.state` (shared state, a route),
:mod:`.decisions` (which tokens a block computes), :mod:`.layer` (the routed layer),
:mod:`.train_forward` (differentiable routing), :mod:`.hooks` (base-model hooks),
:mod:`.handle` (the handle and statistics).

What a routed layer does in one forward call (hidden states ``(B, T, H)``):

1. the router gives a keep probability per token (:mod:`tokenprune.ftp.router`); prefill keeps
   the top ``floor(keep_l * n_valid + 0.5)`` tokens of each row (``keep_l = 1 - s_l``; an int
   budget ``k`` keeps ``min(k, n_valid)``, the router then sees ``1 - min(k, n) / n``), a
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
skips the layer entirely. Statistics stay on the device until ``FTPHandle.stats`` is read.

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

from torch import nn

from .budgets import block_budgets
from .handle import ATTACHED, FTPHandle, check_router
from .hooks import base_post_hook, base_pre_hook
from .layer import RoutedLayer
from .router import Router
from .state import FTPState

SUPPORTED_ATTN = ("sdpa", "eager")


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


def attach_ftp(
    model: nn.Module,
    router: Router,
    keep=None,
    *,
    schedule=None,
    allow_full: bool = False,
    compute_scores: bool = True,
    nested: bool = False,
) -> FTPHandle:
    """Swap the decoder layers of ``model`` for routed wrappers.

    Args:
        model: a transformers ``*ForCausalLM`` (or base model) with ``model.model.layers``.
        router: :class:`TokenRouter`, :class:`StaticRouter` or :class:`RandomRouter`.
        keep: the budget of each block: a fraction of tokens it computes (float in (0, 1]) or an
            int count of each row's tokens, uniform or one per decoder layer; in a prefill each row
            keeps ``floor(keep * n_valid + 0.5)`` tokens (a count: ``min(keep, n_valid)``).
        schedule: per-layer target sparsity, the keyword alias of ``keep`` (``keep = 1 -
            sparsity``): a float for uniform, or ``n_layers`` floats in [0, 1). Give ``keep`` or
            ``schedule``, not both.
        allow_full: accept sparsity 1.0 (the block is skipped by every token).
        compute_scores: compute the attention-score factor (needed by :class:`TokenRouter`).
        nested: no re-entry (not in the paper; default off = the paper's independent per-block
            decisions). In a prefill, tokens the previous block computed outrank every token it
            skipped, so a token that skipped a block comes back only when the next block keeps
            more tokens than the previous one did. A token re-entering after skipped blocks
            carries hidden states those later blocks never see in the dense model; see
            ``docs/ftp.md`` for the measured effect.
    Returns:
        :class:`~tokenprune.ftp.handle.FTPHandle`; ``with attach_ftp(...) as handle:`` detaches
        on exit.
    """
    check_router(router)
    if model in ATTACHED:
        raise ValueError("FTP is already attached to this model; detach it first")
    base, layers = find_decoder(model)
    sched, keeps = block_budgets(keep, len(layers), sparsity=schedule, allow_full=allow_full)
    cfg = getattr(model, "config", None)
    impl = getattr(cfg, "_attn_implementation", "eager") or "eager"
    if impl not in SUPPORTED_ATTN:
        raise ValueError(f"FTP supports attn_implementation in {SUPPORTED_ATTN}, the model uses {impl!r}")
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
        base.register_forward_pre_hook(base_pre_hook(state, len(layers), cache_arg), with_kwargs=True),
        base.register_forward_hook(base_post_hook(state), with_kwargs=True),
    ]
    handle = FTPHandle(model, base, layers, originals, wrappers, state, hooks)
    ATTACHED[model] = handle
    return handle


def detach_ftp(model: nn.Module) -> None:
    """Restore the original decoder layers of a model FTP was attached to (no-op otherwise)."""
    handle = get_handle(model)
    if handle is not None:
        handle.detach()


def get_handle(model: nn.Module) -> FTPHandle | None:
    """The :class:`~tokenprune.ftp.handle.FTPHandle` attached to ``model`` (a handle is its own), or None."""
    if isinstance(model, FTPHandle):
        return model if model.attached else None
    return ATTACHED.get(model)


@contextlib.contextmanager
def ftp_routing(model: nn.Module, router: Router, keep=None, **kwargs):
    """``with ftp_routing(model, router, keep) as handle:`` -- attach on entry, yield the handle, detach.

    The same as ``with attach_ftp(model, router, keep) as handle:`` except that nothing is
    attached before the ``with`` block starts.
    """
    handle = attach_ftp(model, router, keep, **kwargs)
    try:
        yield handle
    finally:
        handle.detach()
