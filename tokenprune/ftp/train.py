"""Router trainer and calibration helpers for FTP (the LLM stays frozen).

Flow (paper): search a schedule with the static router (:func:`calibration_fitness` +
:func:`tokenprune.ftp.schedule.search_schedule`), train the global router with the three
losses (:func:`train_router`), then refine the schedule with the trained router.
"""

from __future__ import annotations

import contextlib
import inspect
import numbers
import time

import numpy as np
import torch
import torch.nn.functional as F

from prunecore.budget import keep_counts, keep_from_sparsity

from .attach import attach_ftp, get_handle
from .handle import FTPHandle
from .losses import distill_loss, guide_loss, guide_weight, sparsity_loss
from .router import TokenRouter


def calibration_windows(ids: torch.Tensor, seq_len: int, n: int, *, seed: int = 0) -> torch.Tensor:
    """``n`` random windows of ``seq_len`` tokens from a 1-D token stream.

    Args:
        ids: (N,) long token ids.
    Returns:
        (n, seq_len) long; deterministic for a seed.
    """
    ids = torch.as_tensor(ids)
    if ids.ndim != 1:
        raise ValueError(f"ids must be 1-D, got shape {tuple(ids.shape)}")
    if ids.numel() < seq_len + 1:
        raise ValueError(f"token stream of {ids.numel()} tokens is shorter than seq_len={seq_len}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len, (n,), generator=g)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])


def contiguous_windows(ids: torch.Tensor, seq_len: int, n: int | None = None) -> torch.Tensor:
    """Non-overlapping windows ``(n, seq_len)`` from the start of a 1-D stream (evaluation)."""
    ids = torch.as_tensor(ids)
    m = ids.numel() // seq_len
    if n is not None:
        m = min(m, n)
    if m < 1:
        raise ValueError(f"token stream of {ids.numel()} tokens is shorter than seq_len={seq_len}")
    return ids[: m * seq_len].view(m, seq_len)


@torch.no_grad()
def lm_eval(model, batches: torch.Tensor, *, batch_size: int = 4, dense_logits=None) -> dict:
    """Next-token NLL/perplexity of ``model`` (routed or not) on ``(N, T)`` windows.

    With ``dense_logits`` (a list of (b, T-1) argmax tensors from the dense model) also returns
    top-1 agreement. Returns ``{"nll", "ppl", "argmax": [...], "agree"?}``.
    """
    tot, cnt, agree, argmaxes = 0.0, 0, 0, []
    for j, i in enumerate(range(0, batches.shape[0], batch_size)):
        x = batches[i : i + batch_size]
        logits = model(input_ids=x, use_cache=False).logits[:, :-1].float()
        tot += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"))
        cnt += x[:, 1:].numel()
        am = logits.argmax(-1)
        argmaxes.append(am)
        if dense_logits is not None:
            agree += int((am == dense_logits[j]).sum())
    out = {"nll": tot / cnt, "ppl": float(np.exp(tot / cnt)), "argmax": argmaxes}
    if dense_logits is not None:
        out["agree"] = agree / cnt
    return out


@torch.no_grad()
def continuation_eval(model, windows: torch.Tensor, n_ctx: int, *, dense_argmax=None) -> dict:
    """Serving-style quality: prefill ``windows[:, :n_ctx]`` (routed as a prefill), then decode
    the rest one token at a time with the KV cache (routed as decode steps), scoring each
    next-token prediction. All rows go together (B = N, no padding).

    Args:
        windows: (N, T) long.
        n_ctx: prompt length (1 <= n_ctx < T).
        dense_argmax: (N, T - n_ctx) argmax predictions of the dense model for agreement.
    Returns:
        ``{"nll", "ppl", "argmax" (N, T - n_ctx), "agree"?}``.
    """
    N, T = windows.shape
    if not 1 <= n_ctx < T:
        raise ValueError(f"n_ctx must be in [1, {T - 1}], got {n_ctx}")
    out = model(input_ids=windows[:, :n_ctx], use_cache=True)
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    logits = [out.logits[:, -1].float()]
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    for t in range(n_ctx, T - 1):
        out = model(input_ids=windows[:, t : t + 1], use_cache=True, **{cache_kw: cache})
        cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        logits.append(out.logits[:, -1].float())
    lg = torch.stack(logits, 1)  # (N, T - n_ctx, V)
    tgt = windows[:, n_ctx:]
    nll = float(F.cross_entropy(lg.reshape(-1, lg.shape[-1]), tgt.reshape(-1)))
    am = lg.argmax(-1)
    res = {"nll": nll, "ppl": float(np.exp(nll)), "argmax": am}
    if dense_argmax is not None:
        res["agree"] = float((am == dense_argmax).float().mean())
    return res


def calibration_fitness(
    model,
    batches: torch.Tensor,
    *,
    router=None,
    batch_size: int = 4,
    n_ctx: int | None = None,
    budget: str = "sparsity",
):
    """Fitness for the schedule GA: calibration NLL of the model routed by ``router``.

    Attaches nothing itself: FTP must be attached (static router by default, paper); the
    returned callable sets the schedule and returns the mean next-token NLL over ``batches``
    (N, T).

    Args:
        n_ctx: ``None`` scores every position of a routed forward (the paper's calibration
            loss). An int scores serving-style: the first ``n_ctx`` tokens are routed as a
            prefill and the remaining ``T - n_ctx`` are decoded one at a time with the cache
            (:func:`continuation_eval`). Reconstruction choice: with tied input/output
            embeddings (SmolLM2) the all-position loss rewards schedules whose skipped tokens
            predict themselves, so the benchmark searches with the continuation loss.
        budget: what the schedules given to the fitness are: ``"sparsity"`` (default) or
            ``"keep"`` (use with ``search_schedule(..., keep=...)``).
    """
    if budget not in ("sparsity", "keep"):
        raise ValueError(f"budget must be 'sparsity' or 'keep', got {budget!r}")
    handle = get_handle(model)
    if handle is None:
        raise ValueError("attach FTP first (attach_ftp(model, StaticRouter(), 1.0))")
    if n_ctx is not None and not 1 <= n_ctx < batches.shape[1]:
        raise ValueError(f"n_ctx must be in [1, {batches.shape[1] - 1}], got {n_ctx}")
    if router is not None:
        handle.set_router(router)

    def fitness(schedule: np.ndarray) -> float:
        values = [float(s) for s in schedule]
        if budget == "keep":
            handle.set_schedule(values)
        else:
            handle.set_schedule(schedule=values)
        if n_ctx is None:
            return lm_eval(model, batches, batch_size=batch_size)["nll"]
        chunks = batches.split(batch_size)
        nll = [continuation_eval(model, x, n_ctx)["nll"] * x.shape[0] for x in chunks]
        return float(sum(nll) / batches.shape[0])

    return fitness


def init_from_static(
    router: TokenRouter,
    *,
    steps: int = 300,
    seq_len: int = 128,
    batch: int = 32,
    lr: float = 1e-2,
    max_sparsity: float = 0.9,
    seed: int = 0,
) -> dict:
    """Initialise the learned router as the static router (no LLM needed).

    Trains on synthetic factors (uniform positions, random scores and their ranks, target
    sparsity ~ U(0, max_sparsity) per row) to reproduce the static router's top-k decisions
    (sink token, then the most recent ``K - 1`` tokens, ``K = floor((1 - s) * T + 0.5)``), with BCE.
    Returns ``{"bce": final loss, "agreement": fraction of matching top-k decisions}``.
    """
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(router.parameters(), lr=lr)
    T = seq_len
    ar = torch.arange(T)
    pos = (ar.float() / (T - 1)).expand(batch, T)

    def sample():
        s = torch.rand(batch, 1, generator=g) * max_sparsity
        raw = torch.rand(batch, T, generator=g) ** 3
        score = torch.log1p(raw / raw.sum(1, keepdim=True) * T)
        rank = raw.argsort(1, descending=True).argsort(1).float() / (T - 1)
        feats = torch.stack([pos, score, rank, s.expand(batch, T)], -1)
        k = torch.stack([keep_counts(torch.tensor([T]), keep_from_sparsity(float(si))) for si in s])  # (B, 1)
        target = (ar[None] == 0) & (k >= 1) | (ar[None] >= T - (k - 1)) & (k >= 2)
        return feats, target.float(), k

    router.train()
    for _ in range(steps):
        feats, target, _ = sample()
        loss = F.binary_cross_entropy(router(feats).clamp(1e-6, 1 - 1e-6), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    router.eval()
    with torch.no_grad():
        feats, target, k = sample()
        p = router(feats)
        order = torch.argsort(p, dim=1, descending=True, stable=True).argsort(1)
        keep = order < k
        agree = float((keep == target.bool()).float().mean())
        bce = float(F.binary_cross_entropy(p.clamp(1e-6, 1 - 1e-6), target))
    return {"bce": bce, "agreement": agree}


def budget_sampler(budgets):
    """``step -> per-block budget list`` from one (L,) schedule, a list of them (cycled), or a callable.

    The values are fractions (keep, or sparsity for the alias); an int count is refused: the
    sparsity loss needs a target fraction per block.
    """
    if callable(budgets):
        return lambda step: fractions(budgets(step))
    if isinstance(budgets, np.ndarray) and budgets.ndim == 1 or len(budgets) and np.ndim(budgets[0]) == 0:
        budgets = [budgets]
    fixed = [fractions(b) for b in budgets]
    return lambda step: fixed[step % len(fixed)]


def fractions(schedule) -> list[float]:
    """A per-block schedule of fractions as floats; ``(L,)`` -> list of L floats."""
    values = list(np.asarray(schedule, dtype=object).reshape(-1))
    for v in values:
        if isinstance(v, numbers.Integral) and not isinstance(v, bool):
            raise TypeError(
                f"train_router budgets are fractions per block (the sparsity loss needs one), got the count {v!r}"
            )
    return [float(v) for v in values]


@contextlib.contextmanager
def _frozen(model):
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)


def train_router(
    model,
    router: TokenRouter,
    keep=None,
    batches: torch.Tensor | None = None,
    *,
    schedules=None,
    steps: int = 200,
    lr: float = 2e-3,
    weight_decay: float = 0.0,
    w_distill: float = 1.0,
    w_sparsity: float = 1.0,
    guide_start: float = 1.0,
    guide_end: float = 0.0,
    guide_curve: str = "cosine",
    distill: str = "hidden",
    distill_tail: int | None = None,
    batch_size: int = 1,
    nested: bool = False,
    seed: int = 0,
    progress: bool = True,
    log_every: int = 10,
    time_limit_s: float | None = None,
) -> list[dict]:
    """Train the global router with the LLM frozen.

    Args:
        model: transformers causal LM (FTP not attached; it is attached for the run and
            detached after).
        router: :class:`TokenRouter` to train (in place).
        keep: per-block keep fractions: one (L,) schedule, a list of them (steps cycle through
            them), or a callable ``step -> schedule``; a single router learns several targets
            (the target sparsity ``1 - keep`` is one of its inputs). Fractions only: the
            sparsity loss needs a target fraction per block.
        batches: (N, T) long calibration windows; a step uses ``batch_size`` of them.
        schedules: the keyword alias of ``keep`` in sparsities (``keep = 1 - sparsity``); give one.
        steps, lr, weight_decay: optimisation (AdamW).
        w_distill, w_sparsity: loss weights; the guide weight decays from ``guide_start`` to
            ``guide_end`` (``guide_curve``).
        distill: ``"hidden"`` (final hidden states, paper) or ``"logits"`` (KL).
        distill_tail: distil only the last ``distill_tail`` positions of each window (the
            tokens a serving-style continuation predicts; reconstruction, the paper distils
            every position); ``None`` = all positions.
        nested: route without re-entry while training (see :func:`attach_ftp`).
        time_limit_s: stop early after this many seconds.
    Returns:
        history: list of dicts per logged step (losses, guide weight, seconds).
    """
    if not isinstance(router, TokenRouter):
        raise TypeError(f"train_router trains a TokenRouter, got {type(router).__name__}")
    if get_handle(model) is not None:
        raise ValueError("detach FTP before training; train_router attaches it itself")
    if batches is None:
        raise ValueError("give batches= ((N, T) long calibration windows)")
    if (keep is None) == (schedules is None):
        raise ValueError("pass keep or its alias schedules= (sparsities), exactly one (keep = 1 - sparsity)")
    unit = "keep" if keep is not None else "schedule"  # the handle's name of the budget given
    sampler = budget_sampler(keep if keep is not None else schedules)
    if distill_tail is not None and not 1 <= distill_tail <= batches.shape[1]:
        raise ValueError(f"distill_tail must be in [1, {batches.shape[1]}], got {distill_tail}")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    base = model.model if hasattr(model, "model") else model
    head = getattr(model, "lm_head", None)
    opt = torch.optim.AdamW(router.parameters(), lr=lr, weight_decay=weight_decay)
    handle: FTPHandle = attach_ftp(model, router, nested=nested, **{unit: sampler(0)})
    st = handle.state
    history, t0 = [], time.time()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc="FTP router", leave=False)
    was_training = model.training
    model.eval()
    router.train()
    try:
        with _frozen(model):
            for step in range(steps):
                idx = rng.choice(batches.shape[0], size=batch_size, replace=False)
                x = batches[torch.as_tensor(idx)]
                handle.set_schedule(**{unit: sampler(step)})
                with torch.no_grad(), handle.paused():
                    teacher = base(input_ids=x, use_cache=False).last_hidden_state
                    if distill == "logits":
                        teacher = head(teacher)
                st.training = True
                st.clear_train()
                try:
                    student = base(input_ids=x, use_cache=False).last_hidden_state
                finally:
                    st.training = False
                if distill == "logits":
                    student = head(student)
                routed = [i for i, p in enumerate(st.probs) if p is not None]
                probs = [st.probs[i] for i in routed]
                valid = [st.train_valid[i] for i in routed]
                if distill_tail is not None:
                    student, teacher = student[:, -distill_tail:], teacher[:, -distill_tail:]
                l_d = distill_loss(student, teacher, kind=distill)
                wg = guide_weight(step, steps, start=guide_start, end=guide_end, curve=guide_curve)
                l_g = guide_loss(probs, [st.static_keeps[i] for i in routed], valid) if routed else l_d * 0
                l_s = sparsity_loss(probs, [st.schedule[i] for i in routed], valid) if routed else l_d * 0
                loss = w_distill * l_d + wg * l_g + w_sparsity * l_s
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                st.clear_train()
                rec = {
                    "step": step,
                    "loss": float(loss.detach()),
                    "distill": float(l_d.detach()),
                    "guide": float(l_g.detach()),
                    "sparsity": float(l_s.detach()),
                    "guide_weight": wg,
                    "seconds": time.time() - t0,
                }
                if step % log_every == 0 or step == steps - 1:
                    history.append(rec)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(distill=f"{rec['distill']:.4f}", guide=f"{rec['guide']:.3f}")
                if time_limit_s is not None and time.time() - t0 > time_limit_s:
                    history.append(rec | {"stopped": "time_limit"})
                    break
    finally:
        handle.detach()
        router.eval()
        model.train(was_training)
        if bar is not None:
            bar.close()
    return history
