"""Continuous batching of masked diffusion LLM requests, block-synchronous (framework-free).

The engine keeps one running batch of rows (requests) and a bounded FIFO queue. Every call to
:meth:`Engine.step` runs one forward pass (one denoising step) of the whole batch and lets each
row's commit rule decide which of its current block's masked tokens become final. The batch is
**block-synchronous**: all rows work on one block each; when every row's block is complete
(a *block boundary*), finished rows leave, queued requests join, and the next pass is a full
pass that starts each row's next block (and rebuilds the caches).

Exactness. A row in the batch computes what :func:`tokenprune.localleap.localleap_generate`
computes for its prompt alone:

* Layout: at each block boundary the rows are re-laid out so that their current blocks share
  the columns ``[S, S + block_length)``: each row's prefix (prompt + finished blocks) is
  left-padded to ``S`` and its suffix (the masks after the block) right-padded. Padding keys are
  masked for every query and position ids are ``cumsum(mask) - 1``, so every real position sees
  the positions and keys it sees alone (the native models' padding handling, already exact).
* Caches: Fast-dLLM's caches are rebuilt by the full pass at each block start and reused only
  within the block; because every row starts its blocks at the same pass, a row's cached passes
  use exactly the cache it would have built alone. (Rows may not join mid-block for this
  reason: a full pass for a joining row would refresh the other rows' caches.)
* Rules and sampling are applied per row with the row's own options, schedule (LLaDA) and
  ``torch.Generator`` (a seeded request draws the noise it would draw alone). A row whose block
  is complete waits (its logits are ignored) and its counters do not move.
* Later blocks never change earlier ones, so stopping a row after the block that holds its EOS
  (or its ``max_tokens``-th token) leaves its text unchanged.

Float caveat: the numbers are equal up to the reduction order of batched kernels (masked
padding keys, other batch sizes); in float64 the ids are equal, in fp32/bf16 a near-tie can
flip (as with any batched inference).
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
from dataclasses import dataclass, field

import torch

from tokenprune.localleap.generate import ModelCall, accepts
from tokenprune.localleap.models.base import padded_positions
from tokenprune.localleap.rules import commit_mask, confidence_from_logits, llada_schedule
from tokenprune.stats import TokenStats

from .options import DecodeOptions, check_options, gen_length_for

__all__ = [
    "QueueFull",
    "EngineClosed",
    "Request",
    "RequestResult",
    "request_stats",
    "Engine",
]


class QueueFull(RuntimeError):
    """The bounded queue of waiting requests is full (the server answers 429)."""


class EngineClosed(RuntimeError):
    """The engine is draining or stopped and takes no new requests (the server answers 503)."""


@dataclass
class RequestResult:
    """What a finished request produced.

    ``tokens``: the generated ids (cut before EOS and at ``max_tokens``); ``finish_reason``:
    ``"stop"`` (EOS), ``"length"`` (``max_tokens``), ``"cancelled"`` or ``"error"``;
    ``forward_passes``: passes during which the row had masked tokens (what it costs alone:
    ``localleap_generate``'s ``row_nfe`` with ``early_stop``); ``block_forward_passes``: those
    per decoded block; ``tokens_committed``: tokens committed by the rule;
    ``batch_forward_passes``: passes the batch ran while the row was in it;
    ``queued_s`` / ``latency_s``: time in the queue / from submission to the end; ``stats``:
    the request's :class:`~tokenprune.stats.TokenStats` (:func:`request_stats`), what the
    server returns as the ``dllm`` field.
    """

    tokens: list[int]
    finish_reason: str
    forward_passes: int = 0
    block_forward_passes: list[int] = field(default_factory=list)
    tokens_committed: int = 0
    batch_forward_passes: int = 0
    queued_s: float = 0.0
    latency_s: float = 0.0
    error: str | None = None
    stats: TokenStats = field(default_factory=lambda: TokenStats("localleap"))


def request_stats(req: Request, result: RequestResult) -> TokenStats:
    """One request's TokenStats: ``tokens_in`` = canvas positions (``gen_length``),
    ``tokens_kept`` = tokens committed, ``forward_passes`` = its passes (``localleap_generate``'s
    ``row_nfe`` alone); extras ``block_forward_passes``, ``batch_forward_passes``,
    ``tokens_per_forward``, ``rule``, ``cache``, ``block_length``, ``gen_length``, ``queue_seconds``."""
    opts, passes = req.options, result.forward_passes
    return TokenStats(
        method="localleap",
        tokens_in=req.gen_length,
        tokens_kept=result.tokens_committed,
        forward_passes=passes,
        extras={
            "block_forward_passes": result.block_forward_passes,
            "batch_forward_passes": result.batch_forward_passes,
            "tokens_per_forward": result.tokens_committed / passes if passes else 0.0,
            "rule": opts.rule,
            "cache": opts.cache,
            "block_length": opts.block_length,
            "gen_length": req.gen_length,
            "queue_seconds": result.queued_s,
        },
    )


class Request:
    """A submitted request: its prompt, options, and how the engine reports to it.

    ``listener(kind, payload)`` (optional) is called from the engine thread with
    ``("block", list_of_new_token_ids)`` each time a block is complete (tokens cut before EOS
    and at ``max_tokens``), then once with ``("done", RequestResult)``. :meth:`wait` blocks
    until the result is there. :meth:`cancel` frees the row at the next step.
    """

    _ids = itertools.count()

    def __init__(self, prompt, max_tokens, options, *, seed=None, listener=None):
        self.id = next(self._ids)
        self.prompt = [int(t) for t in prompt]
        self.max_tokens = int(max_tokens)
        self.options = options
        self.gen_length = gen_length_for(self.max_tokens, options.block_length)
        self.seed = seed
        self.listener = listener
        self.tokens: list[int] = []
        self.result: RequestResult | None = None
        self.submitted = time.perf_counter()
        self.started: float | None = None
        self.cancelled = threading.Event()
        self._done = threading.Event()

    def cancel(self) -> None:
        """Ask the engine to drop this request (a client went away, or a stop string was seen)."""
        self.cancelled.set()

    def wait(self, timeout: float | None = None) -> RequestResult:
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} not finished after {timeout} s")
        return self.result

    def emit(self, kind: str, payload) -> None:
        if kind == "done":
            payload.stats = request_stats(self, payload)
            self.result = payload
        if self.listener is not None:
            self.listener(kind, payload)
        if kind == "done":
            self._done.set()


class Row:
    """Decoding state of one request in the running batch (engine-internal)."""

    def __init__(self, req: Request, mask_id: int, device):
        self.req = req
        self.opts = req.options
        self.P = len(req.prompt)
        self.canvas = torch.tensor(req.prompt + [mask_id] * req.gen_length, dtype=torch.long, device=device)
        self.block = 0
        self.num_blocks = req.gen_length // self.opts.block_length
        self.generator = None
        if self.opts.temperature > 0:
            seed = req.seed if req.seed is not None else int(torch.randint(0, 2**62, ()).item())
            self.generator = torch.Generator(device=device).manual_seed(seed)
        self.steps_per_block = 0
        if self.opts.rule == "llada":
            steps = req.gen_length if self.opts.steps is None else self.opts.steps
            self.steps_per_block = steps // self.num_blocks
        self.schedule = None
        self.step = 0
        self.nfe = 0
        self.block_nfe: list[int] = []
        self.committed = 0
        self.batch_passes = 0
        self.out: list[int] = []

    @property
    def start(self) -> int:
        return self.P + self.block * self.opts.block_length

    def begin_block(self) -> None:
        self.step = 0
        self.block_nfe.append(0)
        if self.opts.rule == "llada":
            self.schedule = llada_schedule(self.opts.block_length, self.steps_per_block)[0].tolist()

    def next_k(self) -> int:
        """LLaDA: tokens to commit at this pass (steps with 0 are skipped, as alone)."""
        while self.step < self.steps_per_block and self.schedule[self.step] == 0:
            self.step += 1
        k = self.schedule[self.step]
        self.step += 1
        return k


@dataclass
class Batch:
    """The padded tensors of the running batch for the current block (engine-internal).

    ``x`` ``(B, T)``: row ``r``'s prefix ends at column ``S``, its block is ``[S, S + L)``,
    its suffix follows; ``attention_mask`` ``(B, T)`` or None when no row is padded."""

    x: torch.Tensor
    attention_mask: torch.Tensor | None
    S: int
    call: ModelCall
    cache: tuple | None = None


def layout(rows: list[Row], block_length: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Align the rows' current blocks: ``(x (B, T), mask (B, T), S)`` with every block at
    ``[S, S + block_length)``; prefixes left-padded, suffixes right-padded with ``pad_id``."""
    S = max(r.start for r in rows)
    R = max(len(r.canvas) - r.start for r in rows)
    device = rows[0].canvas.device
    x = torch.full((len(rows), S + R), int(pad_id), dtype=torch.long, device=device)
    mask = torch.zeros((len(rows), S + R), dtype=torch.long, device=device)
    for i, r in enumerate(rows):  # once per row per block
        s, rest = r.start, len(r.canvas) - r.start
        x[i, S - s : S + rest] = r.canvas
        mask[i, S - s : S + rest] = 1
    return x, mask, S


class Engine:
    """The continuous-batching decoder (see the module docstring).

    Args:
        model: a native LLaDA/Dream (or any model ``localleap_generate`` accepts).
        mask_id, eos_id, pad_id: token ids (``eos_id`` None: rows stop only at ``max_tokens``).
        max_batch: rows in the running batch.
        max_queue: waiting requests; :meth:`submit` raises :class:`QueueFull` beyond.
        shift_logits, scaled_confidence: the family's conventions (default: the model's).
        metrics: optional object with ``on_pass(rows)``, ``on_queue(n)``, ``on_batch(n)``.
    """

    def __init__(
        self,
        model,
        *,
        mask_id: int,
        eos_id: int | None,
        pad_id: int,
        max_batch: int = 8,
        max_queue: int = 64,
        shift_logits: bool | None = None,
        scaled_confidence: bool | None = None,
        metrics=None,
    ):
        if max_batch < 1 or max_queue < 1:  # a request waits in the queue until the next block boundary
            raise ValueError(f"max_batch and max_queue must be >= 1, got {max_batch} and {max_queue}")
        self.model = model
        self.mask_id, self.eos_id, self.pad_id = int(mask_id), eos_id, int(pad_id)
        self.max_batch, self.max_queue = max_batch, max_queue
        self.shift = bool(getattr(model, "shift_logits", False) if shift_logits is None else shift_logits)
        scaled = getattr(model, "scaled_confidence", False) if scaled_confidence is None else scaled_confidence
        self.scaled = bool(scaled)
        self.positions_ok = accepts(model, "position_ids")
        self.ranged = accepts(model, "logits_range")
        self.dual_ok = accepts(model, "replace_position")
        cfg = getattr(model, "config", None)
        self.vocab = getattr(cfg, "embedding_size", None) or getattr(cfg, "vocab_size", None)
        try:
            self.device = next(model.parameters()).device
        except (AttributeError, StopIteration, TypeError):
            self.device = torch.device("cpu")
        self.metrics = metrics
        self.waiting: collections.deque[Request] = collections.deque()
        self.rows: list[Row] = []
        self.batch: Batch | None = None
        self.passes = 0
        self._cv = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None

    # ---- submission (any thread) ----

    def submit(self, prompt, max_tokens: int, options: DecodeOptions, *, seed=None, listener=None) -> Request:
        """Queue a request; raises ValueError (bad options), QueueFull or EngineClosed."""
        if not prompt:
            raise ValueError("the prompt is empty; give at least one token")
        if max_tokens <= 0:
            raise ValueError(f"max_tokens must be positive, got {max_tokens}")
        if self.vocab and not all(0 <= t < self.vocab for t in prompt):
            raise ValueError(f"prompt token ids must be in [0, {self.vocab}) (the model's vocabulary)")
        if seed is not None and not 0 <= seed < 2**63:
            raise ValueError(f"seed must be in [0, 2**63), got {seed}")
        req = Request(prompt, max_tokens, options, seed=seed, listener=listener)
        check_options(options, req.gen_length, dual_ok=self.dual_ok)
        with self._cv:
            if self._closed:
                raise EngineClosed("the server is shutting down")
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} waiting requests); retry later")
            self.waiting.append(req)
            self._report_queue()
            self._cv.notify_all()
        return req

    def queue_length(self) -> int:
        return len(self.waiting)

    def _report_queue(self):
        if self.metrics is not None:
            self.metrics.on_queue(len(self.waiting))

    # ---- decoding (engine thread, or the caller's in tests) ----

    def idle(self) -> bool:
        return not self.rows and not self.waiting

    def step(self) -> bool:
        """One denoising step of the running batch (admitting/retiring rows at a block boundary).
        Returns False when there was nothing to do."""
        self._drop_cancelled()
        if self.batch is None or self._block_done():
            self._block_boundary()
            if not self.rows:
                return False
        self._forward_and_commit()
        return True

    def run_until_idle(self) -> None:
        """Step until no row runs and none waits (tests, benchmarks without a thread)."""
        while self.step():
            pass

    def _drop_cancelled(self) -> None:
        with self._cv:
            for req in [q for q in self.waiting if q.cancelled.is_set()]:
                self.waiting.remove(req)
                req.emit("done", RequestResult([], "cancelled", latency_s=time.perf_counter() - req.submitted))
            self._report_queue()
        keep = [i for i, r in enumerate(self.rows) if not r.req.cancelled.is_set()]
        if len(keep) == len(self.rows):
            return
        for i, r in enumerate(self.rows):
            if i not in keep:
                self._finish(r, "cancelled")
        self.rows = [self.rows[i] for i in keep]
        if not self.rows:
            self.batch = None
            return
        idx = torch.tensor(keep, device=self.device)
        b = self.batch
        am = b.attention_mask.index_select(0, idx) if b.attention_mask is not None else None
        cache = None
        if b.cache is not None:
            cache = tuple(tuple(t.index_select(0, idx) for t in layer) for layer in b.cache)
        self.batch = Batch(b.x.index_select(0, idx), am, b.S, self._call(am), cache)
        self._report_batch()

    def _call(self, am) -> ModelCall:
        positions = padded_positions(am) if am is not None and self.positions_ok else None
        return ModelCall(
            self.model,
            am,
            positions,
            torch.zeros(1, dtype=torch.bool),  # no classifier-free guidance: unused
            self.mask_id,
            0.0,
            self.shift,
            self.ranged,
        )

    def _block_done(self) -> bool:
        L = self.rows[0].opts.block_length
        return not bool((self.batch.x[:, self.batch.S : self.batch.S + L] == self.mask_id).any())

    def _block_boundary(self) -> None:
        """Retire finished rows, admit waiting ones (FIFO, same block shape), lay out the batch."""
        if self.batch is not None:
            L, S = self.rows[0].opts.block_length, self.batch.S
            still = []
            for i, r in enumerate(self.rows):
                r.canvas[r.start : r.start + L] = self.batch.x[i, S : S + L]
                if not self._advance(r, self.batch.x[i, S : S + L].tolist()):
                    still.append(r)
            self.rows = still
        with self._cv:
            key = self.rows[0].opts.batch_key() if self.rows else None
            while self.waiting and len(self.rows) < self.max_batch:
                head = self.waiting[0]
                if key is not None and head.options.batch_key() != key:
                    break  # FIFO: a request of another block shape waits for the batch to drain
                self.waiting.popleft()
                if head.cancelled.is_set():
                    head.emit("done", RequestResult([], "cancelled"))
                    continue
                key = head.options.batch_key()
                head.started = time.perf_counter()
                self.rows.append(Row(head, self.mask_id, self.device))
            self._report_queue()
        self._report_batch()
        if not self.rows:
            self.batch = None
            return
        for r in self.rows:
            r.begin_block()
        x, mask, S = layout(self.rows, self.rows[0].opts.block_length, self.pad_id)
        am = None if bool(mask.all()) else mask
        self.batch = Batch(x, am, S, self._call(am))

    def _advance(self, r: Row, block: list[int]) -> bool:
        """After row ``r``'s block: emit its tokens; True when the row is finished."""
        reason = None
        if self.eos_id is not None and self.eos_id in block:
            block, reason = block[: block.index(self.eos_id)], "stop"
        room = r.req.max_tokens - len(r.out)
        if len(block) >= room and reason is None:
            reason = "length"
        block = block[:room]
        r.out.extend(block)
        r.block += 1
        if reason is None and r.block == r.num_blocks:
            reason = "length"
        if block:
            r.req.emit("block", block)
        if reason is not None:
            self._finish(r, reason)
        return reason is not None

    def _finish(self, r: Row, reason: str, error: str | None = None) -> None:
        now = time.perf_counter()
        r.req.emit(
            "done",
            RequestResult(
                tokens=list(r.out),
                finish_reason=reason,
                forward_passes=r.nfe,
                block_forward_passes=list(r.block_nfe),
                tokens_committed=r.committed,
                batch_forward_passes=r.batch_passes,
                queued_s=(r.req.started or now) - r.req.submitted,
                latency_s=now - r.req.submitted,
                error=error,
            ),
        )

    def _forward_and_commit(self) -> None:
        b, rows = self.batch, self.rows
        opts = rows[0].opts
        L, S, T = opts.block_length, b.S, b.x.shape[1]
        lead = 1 if self.shift and S > 0 else 0
        out = (S - lead, S + L)
        masked = b.x[:, S : S + L] == self.mask_id
        with torch.no_grad():
            if opts.cache == "none":
                logits = b.call(b.x, 0, T, out)[0]
            elif b.cache is None:  # block start: one full pass that caches every position
                logits, cache = b.call(b.x, 0, T, out, want_cache=True)
                if opts.cache == "prefix":  # keep the positions before the fed window
                    cache = tuple(tuple(t[..., : S - lead, :] for t in layer) for layer in cache)
                b.cache = cache
            elif opts.cache == "prefix":
                logits = b.call(b.x, S - lead, T, out, cache=b.cache)[0]
            else:
                logits = b.call(b.x, S - lead, S + L, out, cache=b.cache, replace=True)[0]
            logits = logits[:, lead:]
            commit, x0 = self._commit(rows, logits, masked)
        b.x[:, S : S + L] = torch.where(commit, x0, b.x[:, S : S + L])
        self.passes += 1
        active = masked.any(-1).tolist()
        counts = commit.sum(-1).tolist()
        for r, act, n in zip(rows, active, counts):
            r.batch_passes += 1
            if act:
                r.nfe += 1
                r.block_nfe[-1] += 1
                r.committed += n
        if self.metrics is not None:
            self.metrics.on_pass(len(rows), sum(active))

    def _commit(self, rows: list[Row], logits: torch.Tensor, masked: torch.Tensor):
        """``(commit, x0)`` ``(B, L)``: each active row's rule over its block, with its options.

        Greedy rows with the same sampling options share one call; rows that sample use their
        own generator, as they would alone."""
        B, L = masked.shape
        x0 = torch.zeros((B, L), dtype=torch.long, device=logits.device)
        conf = torch.zeros((B, L), dtype=torch.float32, device=logits.device)
        ent = torch.zeros((B, L), dtype=torch.float32, device=logits.device)
        active = masked.any(-1).tolist()
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(rows):
            if not active[i]:
                continue
            o = r.opts
            if o.temperature > 0:
                groups[("row", i)] = [i]
            else:
                groups.setdefault((o.top_p, o.top_k, o.rule == "eb"), []).append(i)
        for key, idx in groups.items():
            o = rows[idx[0]].opts
            sel = torch.tensor(idx, device=logits.device)
            xs, cs, es = confidence_from_logits(
                logits.index_select(0, sel),
                temperature=o.temperature,
                top_p=o.top_p,
                top_k=o.top_k,
                scaled_confidence=self.scaled,
                generator=rows[idx[0]].generator if key[0] == "row" else None,
                need_entropy=any(rows[i].opts.rule == "eb" for i in idx),
                exclude_id=self.mask_id,
            )
            x0[sel], conf[sel] = xs, cs
            if es is not None:
                ent[sel] = es
        commit = torch.zeros((B, L), dtype=torch.bool, device=logits.device)
        by_rule: dict[tuple, list[int]] = {}
        for i, r in enumerate(rows):
            if active[i]:
                o = r.opts
                by_rule.setdefault((o.rule, o.threshold, o.relaxed_threshold, o.radius, o.gamma), []).append(i)
        for (rule, threshold, relaxed, radius, gamma), idx in by_rule.items():
            sel = torch.tensor(idx, device=logits.device)
            k = None
            if rule == "llada":
                k = torch.tensor([rows[i].next_k() for i in idx], device=logits.device)
            commit[sel] = commit_mask(
                rule,
                conf.index_select(0, sel),
                masked.index_select(0, sel),
                ent.index_select(0, sel),
                k,
                threshold=threshold,
                relaxed_threshold=relaxed,
                radius=radius,
                gamma=gamma,
            )
        return commit, x0

    def _report_batch(self):
        if self.metrics is not None:
            self.metrics.on_batch(len(self.rows))

    def fail_all(self, message: str) -> None:
        """Finish every running row with ``finish_reason="error"`` (a forward pass raised)."""
        for r in self.rows:
            self._finish(r, "error", message)
        self.rows, self.batch = [], None
        self._report_batch()

    # ---- the engine thread ----

    def start(self) -> None:
        """Run :meth:`step` in a daemon thread until :meth:`stop`."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="dllm-engine", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while True:
            with self._cv:
                while self.idle() and not self._closed:
                    self._cv.wait(timeout=0.5)
                if self.idle() and self._closed:
                    return
            try:
                self.step()
            except Exception as exc:  # a failing pass must not take the server down
                self.fail_all(f"{type(exc).__name__}: {exc}")

    def notify(self) -> None:
        """Wake the engine thread (after a cancel)."""
        with self._cv:
            self._cv.notify_all()

    def stop(self, timeout: float | None = None) -> None:
        """Refuse new requests, finish the running and queued ones, then end the thread."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
