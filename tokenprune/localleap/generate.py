"""The semi-autoregressive generate loop of masked diffusion LMs with a pluggable commit rule.

A masked diffusion LM (LLaDA, Dream, ...) fills a canvas of ``gen_length`` mask tokens after
the prompt, block by block. At every forward pass, for each still-masked position of the
current block, the model proposes ``x0 = argmax(logits)`` with confidence
``c = softmax(logits)[x0]``; a commit rule of :mod:`.rules` decides which proposals become
final. :func:`localleap_generate` runs any rule on any model whose ``forward(input_ids,
attention_mask=...)`` returns ``.logits`` over the canvas and counts forward passes (NFE).

The loop reads values back to the host (a wait for the accelerator) exactly once per forward
pass: one small flag tensor saying whether the block still has masked tokens, whether the pass
gave NaN confidences at masked positions and whether a row committed nothing
(:func:`pass_flags`); the rules run with ``check_values=False``. Add one read per call for the
final counts, one for a padded batch and one per block with ``early_stop``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from tokenprune.stats import TokenStats

from .models.base import padded_positions
from .rules import RULES, RuleOptions, commit_mask, confidence_from_logits, llada_step_counts

__all__ = ["DecodeResult", "localleap_generate", "CACHE_MODES", "cache_mode", "pass_flags"]

CACHE_MODES = ("none", "prefix", "dual")


@dataclass
class DecodeResult:
    """Output of :func:`localleap_generate`.

    Unpacks as ``ids, nfe = result`` (the DESIGN contract).

    Attributes:
        ids: ``(B, P + gen_length)`` int64 canvas: (left-padded) prompt + generated tokens.
        nfe: forward passes of the model (a batched pass counts once).
        row_nfe: ``(B,)`` passes during which each row still had masked tokens in its block.
        block_nfe: passes per block (list of ``gen_length / block_length`` ints).
        committed: ``(B,)`` tokens committed by the rule per row (excludes EOS fill).
        tokens_per_forward: ``committed.sum() / row_nfe.sum()``.
        prompt_length: ``P``, where the generated part starts.
        stats: :class:`~tokenprune.stats.TokenStats` with ``method="localleap"``,
            ``tokens_in`` = positions generated (``B * gen_length``), ``tokens_kept`` = tokens
            committed by the rule, ``forward_passes`` = NFE; ``extras``: ``row_nfe`` (sum over
            rows), ``tokens_per_forward``, ``rule``, ``cache``, ``positions_computed`` (token
            positions fed through the model, summed over passes and rows: the compute the
            caches save).
    """

    ids: torch.Tensor
    nfe: int
    row_nfe: torch.Tensor
    block_nfe: list = field(default_factory=list)
    committed: torch.Tensor | None = None
    tokens_per_forward: float = 0.0
    prompt_length: int = 0
    stats: TokenStats | None = None

    def __iter__(self):
        return iter((self.ids, self.nfe))

    @property
    def generated(self) -> torch.Tensor:
        """``(B, gen_length)`` generated tokens."""
        return self.ids[:, self.prompt_length :]


def _left_pad(input_ids, attention_mask, pad_id):
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (B, P), got {tuple(input_ids.shape)}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError("attention_mask must have the shape of input_ids")
        return input_ids.long(), attention_mask
    seqs = [torch.as_tensor(s, dtype=torch.long).reshape(-1) for s in input_ids]
    if not seqs:
        raise ValueError("input_ids is empty")
    P = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), P), int(pad_id), dtype=torch.long)
    am = torch.zeros((len(seqs), P), dtype=torch.long)
    for i, s in enumerate(seqs):  # once per prompt, not per token
        if len(s):
            ids[i, P - len(s) :] = s
            am[i, P - len(s) :] = 1
    if attention_mask is not None:
        raise ValueError("attention_mask is built from the list of prompts; do not pass one")
    return ids, am


def _trim_cache(cache, n: int):
    """Keep the first ``n`` positions of a KV cache (tuple of (k, v) or an object with crop)."""
    if hasattr(cache, "crop"):
        cache.crop(n)
        return cache
    if isinstance(cache, (tuple, list)):
        return tuple(tuple(t[..., :n, :] for t in layer) for layer in cache)
    raise TypeError(f"unsupported past_key_values type {type(cache).__name__}")


def cache_mode(use_cache) -> str:
    """``False``/``None``/``"none"`` -> ``"none"``; ``True``/``"prefix"`` -> ``"prefix"``; ``"dual"``."""
    if use_cache is None or use_cache is False:
        return "none"
    if use_cache is True:
        return "prefix"
    if use_cache in CACHE_MODES:
        return use_cache
    raise ValueError(f"use_cache must be False, True, 'prefix' or 'dual', got {use_cache!r}")


def accepts(model, name: str) -> bool:
    """Whether ``model``'s forward names the keyword ``name`` (``**kwargs`` does not count: such
    models may swallow it silently)."""
    fn = getattr(model, "forward", model)
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == name for p in params)


def pass_flags(conf: torch.Tensor, masked: torch.Tensor, commit: torch.Tensor, still_masked: torch.Tensor):
    """The checks of one pass as one ``(3,)`` bool tensor (read back to the host at once).

    Args:
        conf: ``(B, L)`` confidences of the block; masked: ``(B, L)`` masked before the pass;
        commit: ``(B, L)`` committed by the rule; still_masked: ``(B, L)`` masked after it.
    Returns:
        ``[block not done, NaN confidence at a masked position, a row with masked positions
        committed nothing]``.
    """
    return torch.stack([still_masked.any(), (conf.isnan() & masked).any(), (masked.any(-1) & ~commit.any(-1)).any()])


@dataclass
class ModelCall:
    """One forward pass of the canvas window ``[a, b)`` with what the model needs.

    ``attention_mask`` ``(B, T)`` covers the whole canvas (cached and fed keys); ``positions``
    ``(B, T)`` (``cumsum(mask) - 1``) are passed sliced to the window when the model accepts
    ``position_ids``; ``cfg_scale > 0`` runs the unconditional canvas (real prompt tokens
    replaced by ``mask_id``) in the same batch and mixes ``un + (s + 1) * (cond - un)``;
    ``shift`` moves the logits right by one (Dream). Models that accept ``logits_range`` apply
    their LM head only to the positions whose logits are used.
    """

    model: Callable
    attention_mask: torch.Tensor | None
    positions: torch.Tensor | None
    prompt_tokens: torch.Tensor
    mask_id: int
    cfg_scale: float = 0.0
    shift: bool = False
    ranged: bool = False
    positions_computed: int = 0

    def __call__(self, x, a, b, out, *, cache=None, want_cache=False, replace=False):
        """Logits ``(B, out[1] - out[0], V)`` of canvas positions ``out`` (inside ``[a, b)``),
        shifted within that range when ``shift``, and the cache the model returned."""
        inp, am, pos = x[:, a:b], self.attention_mask, self.positions
        if self.cfg_scale > 0:
            un = x.masked_fill(self.prompt_tokens, self.mask_id)[:, a:b]
            inp = torch.cat([inp, un])
            am = torch.cat([am, am]) if am is not None else None
            pos = torch.cat([pos, pos]) if pos is not None else None
        kwargs = {}
        if am is not None:
            kwargs["attention_mask"] = am
        if pos is not None:
            kwargs["position_ids"] = pos[:, a:b]
        if cache is not None:
            kwargs["past_key_values"] = cache
        if replace:
            kwargs["replace_position"] = (a, b)
        if want_cache or cache is not None:
            kwargs["use_cache"] = want_cache
        if self.ranged:
            kwargs["logits_range"] = (out[0] - a, out[1] - a)
        result = self.model(input_ids=inp, **kwargs)
        logits = result.logits if hasattr(result, "logits") else result
        if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
            raise TypeError("model output must have .logits of shape (B, T, V)")
        expect = (inp.shape[0], out[1] - out[0]) if self.ranged else inp.shape
        if logits.shape[:2] != expect:
            raise ValueError(
                f"model returned logits of shape {tuple(logits.shape)} for input "
                f"{tuple(inp.shape)}; it must score every canvas position it is fed"
            )
        if not self.ranged:
            logits = logits[:, out[0] - a : out[1] - a]
        self.positions_computed += inp.numel()
        if self.cfg_scale > 0:
            cond, un = logits.chunk(2)
            logits = un + (self.cfg_scale + 1) * (cond - un)
        if self.shift:
            logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        return logits, getattr(result, "past_key_values", None)


def localleap_generate(
    model: Callable,
    input_ids,
    *,
    gen_length: int = 256,
    block_length: int = 32,
    mask_id: int,
    rule: str | Callable = "localleap",
    rule_options: RuleOptions | None = None,
    temperature: float = 0.0,
    top_p: float | None = None,
    top_k: int | None = None,
    cfg_scale: float = 0.0,
    eos_id: int | None = None,
    early_stop: bool = False,
    attention_mask: torch.Tensor | None = None,
    pad_id: int | None = None,
    use_cache: bool | str = False,
    shift_logits: bool | None = None,
    scaled_confidence: bool | None = None,
    generator: torch.Generator | None = None,
    **rule_keywords,
) -> DecodeResult:
    """Semi-autoregressive masked-diffusion decoding with a pluggable commit rule.

    The canvas is ``prompt + [mask_id] * gen_length``; it is filled block by block
    (``block_length`` tokens), left to right; tokens after the current block are never
    committed. Each iteration runs one forward pass, takes ``x0``/confidence at the current
    block's masked positions and commits what ``rule`` selects.

    Args:
        model: callable ``model(input_ids=(B,T), attention_mask=(B,T) or None) -> obj`` with
            ``obj.logits`` of shape ``(B, T, V)`` (bidirectional, LLaDA/Dream-style). When its
            forward takes ``position_ids`` and the batch is padded, ``cumsum(mask) - 1`` is passed.
        input_ids: ``(B, P)`` int tensor (left-padded when ``attention_mask`` has zeros), or a
            list of 1-D prompts that are left-padded here with ``pad_id``.
        gen_length: tokens to generate; must be a multiple of ``block_length``.
        mask_id: the model's mask token id (from its tokenizer/config; never guessed here).
        rule: ``"localleap"`` (default), ``"fastdllm"``, ``"llada"``, ``"eb"`` or a callable
            ``rule(conf, masked) -> (B, L) bool`` over the current block.
        rule_options: the rule's parameters as one :class:`~tokenprune.localleap.rules.RuleOptions`
            (default: its defaults); ``**rule_keywords`` (``threshold``, ``relaxed_threshold``,
            ``radius``, ``gamma``, ``steps``, ``remasking``) replace single fields of it, so
            ``localleap_generate(..., threshold=0.95)`` works as before; any other keyword is a
            ``TypeError`` naming the rule options. ``threshold``, ``relaxed_threshold``,
            ``radius``: LocalLeap / Fast-dLLM parameters; ``gamma``: EB-sampler entropy budget;
            ``steps``: LLaDA only; total steps over ``gen_length`` (default ``gen_length``: one
            token per step), split evenly over blocks, steps in which no row commits are
            skipped; ``remasking``: ``"low_confidence"`` (commit by model confidence) or
            ``"random"`` (LLaDA's random remasking: uniform random scores; ``rule="llada"`` only).
        temperature: 0 = greedy; > 0 Gumbel-max sampling in float64.
        top_p, top_k: nucleus / top-k filtering before choosing ``x0`` (Dream's options).
        cfg_scale: LLaDA's classifier-free guidance (> 0: each pass also runs the canvas with
            the prompt masked, in the same batch; counted as one pass). Not with ``use_cache``.
        eos_id: end-of-sequence id. With ``early_stop=True``, once a finished block of a row
            contains ``eos_id``, the rest of that row is filled with ``eos_id`` without
            further passes, and decoding stops when every row is done.
        attention_mask: ``(B, P)`` 1/0 for left-padded tensor prompts; extended with ones
            over the generated part and passed to the model (dropped when it has no zeros).
        pad_id: padding id for list prompts (default ``eos_id`` if given, else ``mask_id``).
        use_cache: Fast-dLLM's block-wise caches (approximations for bidirectional models;
            ``False`` is exact). Every block starts with a full pass that returns the keys and
            values of every position (``use_cache=True``). ``True``/``"prefix"``: the block's
            later passes feed ``canvas[:, block_start:]`` with the cache of the positions before
            (``past_key_values``, a tuple of per-layer ``(k, v)`` with positions on dim -2, or
            an object with ``crop``). ``"dual"``: they feed only the block with the cache of
            every position and ``replace_position=(a, b)`` (native models; the block's keys and
            values are refreshed, prefix and suffix are reused). With ``shift_logits`` the fed
            window starts one position earlier (the logits of the block's first token).
        shift_logits: the logits for position ``i`` are the model's at ``i - 1`` (Dream). None:
            the model's own ``shift_logits`` attribute (native models), else False.
        scaled_confidence: confidence from the temperature-scaled, filtered distribution
            (Dream) rather than the unscaled one (LLaDA). None: the model's attribute, else False.
        generator: torch generator for the Gumbel noise and random remasking.
    Returns:
        :class:`DecodeResult` (unpacks as ``ids, nfe``).
    """
    if gen_length <= 0 or block_length <= 0:
        raise ValueError("gen_length and block_length must be positive")
    if gen_length % block_length:
        raise ValueError(f"gen_length ({gen_length}) must be a multiple of block_length ({block_length})")
    if mask_id is None:
        raise ValueError("mask_id is required (take it from the tokenizer or config)")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if isinstance(rule, str) and rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; expected one of {RULES} or a callable")
    if not isinstance(rule, str) and not callable(rule):
        raise TypeError("rule must be a rule name or a callable(conf, masked) -> bool mask")
    opts = RuleOptions.resolve(rule_options, **rule_keywords)
    opts.check(rule)
    threshold, relaxed_threshold, radius, gamma = opts.threshold, opts.relaxed_threshold, opts.radius, opts.gamma
    steps, remasking = opts.steps, opts.remasking
    if early_stop and eos_id is None:
        raise ValueError("early_stop=True needs eos_id")
    mode = cache_mode(use_cache)
    if cfg_scale < 0:
        raise ValueError(f"cfg_scale must be >= 0, got {cfg_scale}")
    if cfg_scale > 0 and mode != "none":
        raise ValueError("cfg_scale > 0 is not supported together with use_cache; pass use_cache=False")
    if mode == "dual" and not accepts(model, "replace_position"):
        raise TypeError("use_cache='dual' needs a model whose forward takes replace_position (the native models)")
    if shift_logits is None:
        shift_logits = getattr(model, "shift_logits", False) is True
    if scaled_confidence is None:
        scaled_confidence = getattr(model, "scaled_confidence", False) is True

    prompt, am = _left_pad(
        input_ids, attention_mask, pad_id if pad_id is not None else (eos_id if eos_id is not None else mask_id)
    )
    device = prompt.device
    try:  # follow the model's device when it has parameters
        device = next(model.parameters()).device
    except (AttributeError, StopIteration, TypeError):
        pass
    prompt = prompt.to(device)
    B, P = prompt.shape
    T = P + gen_length
    x = torch.cat([prompt, torch.full((B, gen_length), int(mask_id), dtype=torch.long, device=device)], dim=1)
    full_am = positions = None
    prompt_tokens = torch.zeros_like(x, dtype=torch.bool)
    prompt_tokens[:, :P] = True
    if am is not None:
        am = am.to(device).long()
        prompt_tokens[:, :P] = am.bool()
        if not bool(am.all()):  # one check before the loop; unpadded batches pass no mask
            full_am = torch.cat([am, torch.ones((B, gen_length), dtype=torch.long, device=device)], dim=1)
            if accepts(model, "position_ids"):
                positions = padded_positions(full_am)
    call = ModelCall(
        model,
        full_am,
        positions,
        prompt_tokens,
        int(mask_id),
        float(cfg_scale),
        bool(shift_logits),
        accepts(model, "logits_range"),
    )
    num_blocks = gen_length // block_length
    steps_per_block, schedule = 0, []
    if rule == "llada":
        total_steps = gen_length if steps is None else int(steps)
        if total_steps < num_blocks or total_steps % num_blocks:
            raise ValueError(
                f"steps ({total_steps}) must be a positive multiple of the number of blocks ({num_blocks})"
            )
        steps_per_block = total_steps // num_blocks
        # every row still running starts a block with all its block_length positions masked
        # (rows finished by early_stop have none, and commit nothing whatever k is): one schedule
        schedule = llada_step_counts(block_length, steps_per_block)
    rule_name = rule if isinstance(rule, str) else getattr(rule, "__name__", "custom")

    nfe = 0
    row_nfe = torch.zeros(B, dtype=torch.long, device=device)
    committed = torch.zeros(B, dtype=torch.long, device=device)
    block_nfe: list[int] = []
    done = torch.zeros(B, dtype=torch.bool, device=device)

    with torch.no_grad():
        for b in range(num_blocks):
            s, e = P + b * block_length, P + (b + 1) * block_length
            if early_stop and done.all():
                block_nfe.append(0)
                continue
            lead = 1 if shift_logits and s > 0 else 0  # the block's first logits come from s - 1
            block_passes, step, cache = 0, 0, None
            # a block starts fully masked in every running row: no read to decide the first pass
            masked = x[:, s:e] == mask_id
            while True:
                if rule == "llada":
                    while step < steps_per_block and schedule[step] == 0:  # steps committing nothing
                        step += 1
                    if step >= steps_per_block:  # schedule exhausted (cannot happen: it sums to n)
                        break
                out = (s - lead, e)  # the logits used (the block's, from one position earlier when shifted)
                if mode == "none":
                    logits = call(x, 0, T, out)[0]
                elif cache is None:  # block start: one full pass that caches every position
                    logits, cache = call(x, 0, T, out, want_cache=True)
                    if cache is None:
                        raise TypeError(f"use_cache={use_cache!r} but the model returned no past_key_values")
                    if mode == "prefix":
                        cache = _trim_cache(cache, s - lead)
                elif mode == "prefix":
                    logits = call(x, s - lead, T, out, cache=cache)[0]
                else:
                    logits = call(x, s - lead, e, out, cache=cache, replace=True)[0]
                block_logits = logits[:, lead:]
                nfe += 1
                block_passes += 1
                row_nfe += masked.any(-1).long()
                x0, conf, ent = confidence_from_logits(
                    block_logits,
                    temperature=temperature,
                    top_p=top_p,
                    top_k=top_k,
                    scaled_confidence=scaled_confidence,
                    generator=generator,
                    need_entropy=rule == "eb",
                    exclude_id=int(mask_id),
                )
                if remasking == "random":
                    conf = torch.rand(conf.shape, device=device, generator=generator)
                k = schedule[step] if rule == "llada" else None
                step += 1
                commit = commit_mask(
                    rule,
                    conf,
                    masked,
                    ent,
                    k,
                    threshold=threshold,
                    relaxed_threshold=relaxed_threshold,
                    radius=radius,
                    gamma=gamma,
                    check_values=False,
                )
                x[:, s:e] = torch.where(commit, x0, x[:, s:e])
                committed += commit.sum(-1)
                still_masked = x[:, s:e] == mask_id
                going, nan, stuck = pass_flags(conf, masked, commit, still_masked).tolist()  # the pass's one read
                if nan:
                    raise ValueError(
                        f"NaN confidences at masked positions in pass {nfe} (block {b}): the model's logits hold "
                        "NaN; check its weights (load_dllm refuses non-finite weights) and its dtype (float16 "
                        "overflows: use bfloat16 or float32)"
                    )
                if stuck:
                    raise RuntimeError(
                        f"rule {rule_name!r} committed nothing for a row with masked tokens (pass {nfe}); "
                        "it would never finish"
                    )
                if not going:
                    break
                masked = still_masked
            block_nfe.append(block_passes)
            if early_stop:
                done |= (x[:, P:e] == eos_id).any(-1)
                if e < T:  # finished rows: the rest is EOS (no read: a no-op for running rows)
                    tail = x[:, e:]
                    x[:, e:] = torch.where(done.unsqueeze(1), torch.full_like(tail, eos_id), tail)
    total_rows, total_committed = torch.stack([row_nfe.sum(), committed.sum()]).tolist()  # one read per call
    tpf = total_committed / total_rows if total_rows else 0.0
    stats = TokenStats(
        method="localleap",
        tokens_in=B * gen_length,
        tokens_kept=total_committed,
        forward_passes=nfe,
        extras={
            "row_nfe": total_rows,
            "tokens_per_forward": tpf,
            "rule": rule_name,
            "cache": mode,
            "positions_computed": call.positions_computed,
        },
    )
    return DecodeResult(
        ids=x,
        nfe=nfe,
        row_nfe=row_nfe,
        block_nfe=block_nfe,
        committed=committed,
        tokens_per_forward=tpf,
        prompt_length=P,
        stats=stats,
    )
