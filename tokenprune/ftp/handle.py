"""The handle of one FTP attachment: a context manager yielding itself, controls, and ``stats``.

``with attach_ftp(model, router, keep) as handle:`` -- run ``handle.model`` (the model, with
routed layers), read ``handle.stats`` (a :class:`~tokenprune.stats.TokenStats`). One release of
grace: calling ``handle.stats()`` and using the handle as the model (``handle.generate(...)``,
``handle(ids)``) still work and warn with the new spelling.
"""

from __future__ import annotations

import contextlib
import warnings
import weakref

import torch
from torch import nn

from tokenprune.stats import TokenStats

from .budgets import block_budgets
from .router import Router
from .state import DECODE, PREFILL

ATTACHED: weakref.WeakKeyDictionary[nn.Module, FTPHandle] = weakref.WeakKeyDictionary()  # model -> its handle


def layer_linear_flops(layer: nn.Module) -> int:
    """FLOPs per token of a decoder layer's linear maps (2 * weights); attention scores excluded."""
    return int(sum(2 * m.weight.numel() for m in layer.modules() if isinstance(m, nn.Linear)))


def check_router(router) -> None:
    """Raise a TypeError unless ``router`` is a :class:`~tokenprune.ftp.router.Router`."""
    if not isinstance(router, Router):
        raise TypeError(f"router must be a TokenRouter, StaticRouter or RandomRouter, got {type(router).__name__}")


class HandleStats(TokenStats):
    """The :class:`~tokenprune.stats.TokenStats` of :attr:`FTPHandle.stats`.

    Calling it (the old ``handle.stats()`` method) is deprecated: it warns and returns itself.
    """

    def __call__(self) -> HandleStats:
        warnings.warn(
            "FTPHandle.stats is a property now: use handle.stats instead of handle.stats() "
            "(the call form will be removed in the next release)",
            DeprecationWarning,
            stacklevel=2,
        )
        return self


def forwarded(name: str) -> None:
    """Warn that the handle was used as the model (the old ``with attach_ftp(...) as model``)."""
    warnings.warn(
        f"attach_ftp(...) yields its handle now, not the model: use handle.model.{name} "
        "(using the handle as the model will be removed in the next release)",
        DeprecationWarning,
        stacklevel=3,
    )


class FTPHandle:
    """Result of :func:`~tokenprune.ftp.attach.attach_ftp`: a context manager yielding itself, and a control panel.

    Attributes:
        model: the model whose decoder layers are routed (run it, e.g. ``handle.model.generate``).
        stats: (property) routing counts since the last reset, a :class:`~tokenprune.stats.TokenStats`.
    """

    def __init__(self, model, base, layers, originals, wrappers, state, hooks):
        self.model, self.base, self.layers = model, base, layers
        self.originals, self.wrappers, self.state = originals, wrappers, state
        self._hooks = hooks
        self.attached = True
        self.flops_per_token = [layer_linear_flops(m) for m in originals]

    # context manager -------------------------------------------------
    def __enter__(self) -> FTPHandle:
        return self

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
        ATTACHED.pop(self.model, None)

    # controls --------------------------------------------------------
    def set_schedule(self, keep=None, *, schedule=None, allow_full: bool = False) -> None:
        """New per-block budgets: ``keep`` (fractions or int counts) or its alias ``schedule=`` (sparsities)."""
        self.state.schedule, self.state.keep = block_budgets(
            keep, len(self.originals), sparsity=schedule, allow_full=allow_full
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

    @property
    def stats(self) -> HandleStats:
        """Routing counts since the last reset, as one :class:`~tokenprune.stats.TokenStats`.

        Reads the device counters once. ``tokens_in``/``tokens_kept``: token-block pairs routed /
        computed (summed over blocks and phases); ``forward_passes``: forward calls of the routed
        model (one per ``generate`` step: the forward passes of the model being accelerated).
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
        return HandleStats("ftp", sum(total), sum(kept), st.forward_passes, extras)

    # one release of grace: the handle used as the model ------------------
    def __getattr__(self, name: str):
        if name.startswith("__") or name == "model" or "model" not in self.__dict__:
            raise AttributeError(name)
        forwarded(name)
        return getattr(self.model, name)

    def __call__(self, *args, **kwargs):
        forwarded("__call__")
        return self.model(*args, **kwargs)
