"""The shared plumbing of every FoPru model family.

:class:`FoPruAdapter` owns everything that does not depend on the family: option checks, the
attention-capture lifecycle, splitting a call's keyword arguments into the multimodal inputs
it prunes and the rest, shrinking every image's placeholder run in ``input_ids`` /
``attention_mask`` (and any other per-token tensor), passing the pruned features to the
model's own ``generate``/``forward``, restoring the caller's prompt and the stats
(``forward_passes`` = the language model's forward calls, counted by a hook: no host sync).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn

from tokenprune.fopru.core import (
    METHODS,
    ROW_MODES,
    STRATEGIES,
    check_token_keep,
    per_image_keep,
    shrink_prompt,
)
from tokenprune.stats import TokenStats

__all__ = [
    "CORE_OPTIONS",
    "FEATURE_PASSING",
    "Encoded",
    "FoPruAdapter",
    "Prepared",
    "PrunedGeneration",
    "count_forward_calls",
    "language_model",
    "pad_token_id",
    "restore_original_prompt",
]

FEATURE_PASSING = ("auto", "mm_encoder_outputs", "inputs_embeds")


@dataclass
class Encoded:
    """One call's encoded images.

    Attributes:
        features: per image ``(N_i, D)`` projected features, one per placeholder of its run,
            in run order (what the LLM would see unpruned).
        scores: the family's FoPru scores (a ``(n_images, N)`` tensor or one tensor per image).
        info: anything else the family's :meth:`FoPruAdapter.select` needs (grids, layouts).
    """

    features: list[torch.Tensor]
    scores: Any
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Prepared:
    """A pruned call: ``call`` are the keyword arguments for the model's ``generate`` or
    ``forward`` (shrunk ``input_ids``/``attention_mask``, the pruned features, family extras
    such as positions); ``input_ids`` is the caller's original prompt."""

    call: dict[str, Any]
    input_ids: torch.Tensor
    stats: TokenStats


class PrunedGeneration(NamedTuple):
    """What :meth:`FoPruAdapter.generate` returns: ``output`` is ``generate``'s output (a
    ``(B*R, P + T)`` tensor or an output with ``.sequences``), ``stats`` the call's stats and
    ``prompt_length`` ``P``, where the generated part starts in the sequences."""

    output: Any
    stats: TokenStats
    prompt_length: int


def language_model(model: nn.Module) -> nn.Module:
    """The LVLM's language model (what ``forward_passes`` counts): ``model.get_decoder()``, else ``model``."""
    get = getattr(model, "get_decoder", None)
    return get() if callable(get) else model


@contextlib.contextmanager
def count_forward_calls(module: nn.Module) -> Iterator[list[int]]:
    """Count ``module``'s forward calls while the block runs: yields a one-element list whose
    value grows by one per call (a forward pre-hook; a Python counter, no host sync)."""
    calls = [0]

    def count(*_):
        calls[0] += 1

    handle = module.register_forward_pre_hook(count)
    try:
        yield calls
    finally:
        handle.remove()


def pad_token_id(model: nn.Module) -> int:
    """The pad id used to re-pad shrunk prompts (generation config, then the configs; 0 if none)."""
    gen_cfg = getattr(model, "generation_config", None)
    pad = getattr(gen_cfg, "pad_token_id", None)
    if pad is None:
        text_cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        pad = getattr(model.config, "pad_token_id", None) or getattr(text_cfg, "pad_token_id", None)
    if isinstance(pad, (list, tuple)):
        pad = pad[0]
    return int(pad) if pad is not None else 0


def output_sequences(out) -> torch.Tensor:
    """``generate``'s sequences: ``out`` itself or ``out.sequences``."""
    return out if isinstance(out, torch.Tensor) else out.sequences


def per_sequence(ids: torch.Tensor, seqs: torch.Tensor) -> torch.Tensor:
    """``(B, L)`` prompt rows repeated for the ``(B*R, ...)`` returned sequences, on their device."""
    rep = seqs.shape[0] // ids.shape[0]
    ids = ids.to(seqs.device)
    return ids.repeat_interleave(rep, 0) if rep > 1 else ids


def starts_with(seqs: torch.Tensor, prefix: torch.Tensor) -> bool:
    """True when every row of ``seqs`` ``(N, L)`` begins with its row of ``prefix`` ``(N, L1)``."""
    return seqs.shape[1] >= prefix.shape[1] and torch.equal(seqs[:, : prefix.shape[1]], prefix)


def restore_original_prompt(out, input_ids: torch.Tensor, new_ids: torch.Tensor):
    """Put the caller's prompt back in front of the generated tokens.

    Args:
        out: ``generate``'s output (a ``(B*R, L)`` tensor or an output with ``.sequences``),
            ``R`` = ``num_return_sequences`` (or beams returned).
        input_ids: ``(B, L0)`` the caller's prompt; new_ids: ``(B, L1)`` the shrunk prompt.

    Returns:
        ``out`` with sequences ``[input_ids, new tokens]`` of shape ``(B*R, L0 + new)``.
    """
    seqs = output_sequences(out)
    input_ids, new_ids = per_sequence(input_ids, seqs), per_sequence(new_ids, seqs)
    if starts_with(seqs, new_ids):
        seqs = torch.cat([input_ids, seqs[:, new_ids.shape[1] :]], dim=1)
    else:  # generate returned only the new tokens (inputs_embeds path on some versions)
        seqs = torch.cat([input_ids, seqs], dim=1)
    if isinstance(out, torch.Tensor):
        return seqs
    out.sequences = seqs
    return out


def shrunk_prompt_length(out, new_ids: torch.Tensor) -> int:
    """Width of the shrunk prompt ``new_ids`` ``(B, L1)`` at the front of ``out``'s sequences,
    or 0 when ``generate`` returned only the new tokens (inputs_embeds path on some versions)."""
    seqs = output_sequences(out)
    return new_ids.shape[1] if starts_with(seqs, per_sequence(new_ids, seqs)) else 0


class FoPruAdapter:
    """FoPru for one model family; subclass it in one module and ``@register`` the subclass.

    A family sets these class attributes:

    * ``family``: human name for messages (``"LLaVA"``);
    * ``input_keys``: the call's keyword arguments it consumes besides ``input_ids``,
      ``attention_mask`` and ``labels`` (``pixel_values``, ``image_grid_thw`` ...);
    * ``visual_keys``: the inputs that carry images: a call with any of them set is pruned;
    * ``video_keys``: every video input of the model's ``forward`` (``pixel_values_videos``,
      ``video_grid_thw`` ...): FoPru prunes images only, so a call with any of them set is
      refused with a clear error (never run unpruned); a call with neither images nor videos
      runs unchanged (text-only);
    * ``family_options``: extra FoPru options and their defaults (``{"newline": "row"}``);

    and implements:

    * :meth:`make_capture` — the attention capture on the scoring layer (``attach``/``remove``/``reset``);
    * :meth:`encode` — run the model's own image-feature path (the capture is attached and
      reset around it) and return :class:`Encoded` per-image features and scores; it validates
      the family's inputs and raises a clear error for what it cannot prune;
    * :meth:`select` — per image, the sorted positions to keep inside its placeholder run.

    Optional overrides: :meth:`default_method`, :meth:`check_options` (construction-time
    checks), :meth:`kept_from_indices` (user-given indices -> run positions),
    :meth:`token_tensors` and :meth:`finish_call` (more per-token tensors to shrink, e.g.
    M-RoPE positions), :meth:`feature_inputs` (how features reach the model),
    :meth:`stats_extras`.
    """

    family: str = ""
    model_types: tuple[str, ...] = ()
    input_keys: tuple[str, ...] = ("pixel_values",)
    visual_keys: tuple[str, ...] = ("pixel_values",)
    video_keys: tuple[str, ...] = ()
    family_options: dict[str, Any] = {}

    def __init__(
        self,
        model: nn.Module,
        *,
        keep=0.25,
        strategy: str = "rank",
        layer: int | None = None,
        method: str | None = None,
        row_mode: str = "rows",
        grid: tuple[int, int] | None = None,
        feature_passing: str = "auto",
        restore_prompt: bool = True,
        **family_options,
    ):
        unknown = sorted(set(family_options) - set(self.family_options))
        if unknown:
            known = ", ".join(sorted(self.family_options)) or "none"
            raise TypeError(f"unknown FoPru option(s) {unknown} for {self.family} (family options: {known})")
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}; expected one of {STRATEGIES}")
        if row_mode not in ROW_MODES:
            raise ValueError(f"unknown row_mode {row_mode!r}; expected one of {ROW_MODES}")
        if method is not None and method not in METHODS:
            raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
        if feature_passing not in FEATURE_PASSING:
            raise ValueError(f"unknown feature_passing {feature_passing!r}; expected one of {FEATURE_PASSING}")
        for kp in keep if isinstance(keep, (list, tuple)) else [keep]:
            check_token_keep(kp)
        self.model = model
        self.method = method if method is not None else self.default_method()
        self.keep = keep
        self.strategy = strategy
        self.layer = layer
        self.row_mode = row_mode
        self.grid = grid
        self.restore_prompt = bool(restore_prompt)
        self.options = {**self.family_options, **family_options}
        self.image_token_id = int(model.config.image_token_id)
        self.pad_id = pad_token_id(model)
        self.language_model = language_model(model)
        if feature_passing == "auto":  # resolved once, not per call
            accepts = "mm_encoder_outputs" in inspect.signature(model.forward).parameters
            feature_passing = "mm_encoder_outputs" if accepts else "inputs_embeds"
        self.feature_passing = feature_passing
        self.check_options()
        self.capture = self.make_capture()

    @classmethod
    def option_names(cls) -> frozenset[str]:
        """The FoPru options this adapter takes (constructor keywords and ``family_options``)."""
        return CORE_OPTIONS | set(cls.family_options)

    # ------------------------------------------------------------------ family interface
    def default_method(self) -> str:
        """The scoring ``method`` when the caller passes none (``"colmean"``: works for every tower)."""
        return "colmean"

    def check_options(self) -> None:
        """Raise a clear error for options the family cannot honour (called at construction)."""

    def make_capture(self):
        raise NotImplementedError

    def encode(self, mm: dict[str, Any]) -> Encoded:
        raise NotImplementedError

    def select(self, enc: Encoded, keeps: list) -> list[torch.Tensor]:
        raise NotImplementedError

    def kept_from_indices(self, enc: Encoded, kept_indices: Sequence) -> list[torch.Tensor]:
        """User-given per-image positions -> sorted unique run positions (checked in range)."""
        out = []
        for k, f in zip(kept_indices, enc.features):
            k = torch.as_tensor(k, dtype=torch.long).unique()  # sorted, no duplicates
            n = f.shape[0]
            if k.numel() == 0 or int(k.min()) < 0 or int(k.max()) >= n:
                raise ValueError(f"kept_indices must be non-empty packed positions within [0, {n}) of the image's run")
            out.append(k)
        return out

    def token_tensors(self, mm: dict[str, Any], enc: Encoded) -> dict[str, tuple[torch.Tensor, int]]:
        """Extra per-token tensors ``(..., B, L)`` to shrink with the prompt, with their pad value."""
        return {}

    def finish_call(self, call: dict[str, Any], mm: dict[str, Any]) -> None:
        """Last edits of the pruned call's keyword arguments (e.g. turn shrunk positions into ``position_ids``)."""

    def stats_extras(self, enc: Encoded, kept: list[torch.Tensor]) -> dict[str, Any]:
        """Family-specific stats; ``kept_indices`` defaults to the kept run positions (on the
        model's device: no copy to the host)."""
        return {}

    # ------------------------------------------------------------------ capture lifecycle
    def attach(self) -> None:
        self.capture.attach()

    def remove(self) -> None:
        self.capture.remove()

    def encode_with_capture(self, mm: dict[str, Any]) -> Encoded:
        """:meth:`encode` with the capture attached (and removed again if it was not attached)."""
        owned = not self.capture.attached
        self.capture.attach()
        self.capture.reset()
        try:
            with torch.no_grad():
                return self.encode(mm)
        finally:
            if owned:
                self.capture.remove()

    # ------------------------------------------------------------------ plumbing
    def has_visual(self, kwargs: Mapping[str, Any]) -> bool:
        """True when the call carries images or videos (it must be pruned or refused)."""
        return any(kwargs.get(k) is not None for k in (*self.visual_keys, *self.video_keys))

    def refuse_videos(self, kwargs: Mapping[str, Any]) -> None:
        """Raise a clear ``ValueError`` when the call carries a video input (FoPru prunes images only)."""
        given = [k for k in self.video_keys if kwargs.get(k) is not None]
        if given:
            raise ValueError(
                f"FoPru for {self.family} prunes images only; videos are not supported (the call passes "
                f"{', '.join(given)}): run video prompts outside the FoPru context, or without fopru_generate"
            )

    def split_inputs(self, kwargs: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """``(multimodal inputs this adapter consumes, everything else)``."""
        consumed = ("input_ids", "attention_mask", "labels", *self.input_keys, *self.video_keys)
        mm = {k: v for k, v in kwargs.items() if k in consumed}
        rest = {k: v for k, v in kwargs.items() if k not in consumed}
        return mm, rest

    def prepare(self, mm: dict[str, Any], kept_indices: Sequence | None = None) -> Prepared:
        """Encode, score, select and shrink one call's multimodal inputs."""
        self.refuse_videos(mm)
        input_ids = mm.get("input_ids")
        if input_ids is None or not self.has_visual(mm):
            raise ValueError(f"FoPru needs input_ids and {' or '.join(self.visual_keys)}")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (B, L), got {tuple(input_ids.shape)}")
        mask = mm.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(input_ids)
        enc = self.encode_with_capture(mm)
        n_tokens = [f.shape[0] for f in enc.features]
        if kept_indices is None:
            kept = self.select(enc, per_image_keep(self.keep, len(n_tokens)))
        else:
            if len(kept_indices) != len(n_tokens):
                raise ValueError(f"kept_indices has {len(kept_indices)} entries for {len(n_tokens)} images")
            kept = self.kept_from_indices(enc, kept_indices)
        tensors = {"input_ids": (input_ids, self.pad_id), **self.token_tensors(mm, enc)}
        if mm.get("labels") is not None:
            tensors["labels"] = (mm["labels"], -100)
        # kept image tokens and attended text (padding rebuilt to the shortest width), one host sync
        new_mask, shrunk, prompt_in, prompt_kept = shrink_prompt(
            input_ids, mask, self.image_token_id, n_tokens, kept, list(tensors.values())
        )
        call = dict(zip(tensors, shrunk))
        call["attention_mask"] = new_mask
        self.finish_call(call, mm)
        pruned = self.gather_features(enc, kept)
        call.update(self.feature_inputs(call["input_ids"], pruned, enc, kept))
        kept_counts = [int(k.numel()) for k in kept]
        extras = {
            "image_tokens_in": n_tokens,
            "image_tokens_kept": kept_counts,
            "prompt_tokens_in": prompt_in,
            "prompt_tokens_kept": prompt_kept,
            "kept_indices": list(kept),
            "vision_encodings": 1,
            **self.stats_extras(enc, kept),
        }
        # forward_passes: the language model's calls, filled in by generate / forward
        stats = TokenStats("fopru", sum(n_tokens), sum(kept_counts), extras=extras)
        return Prepared(call, input_ids, stats)

    def gather_features(self, enc: Encoded, kept: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per image ``(K_i, D)`` kept features (one gather when all images have the same N and K)."""
        feats = enc.features
        if len({f.shape[0] for f in feats}) == 1 and len({int(k.numel()) for k in kept}) == 1 and len(feats) > 1:
            stacked = torch.stack(feats)
            idx = torch.stack([k.to(stacked.device) for k in kept])
            return list(stacked.gather(1, idx[..., None].expand(-1, -1, stacked.shape[-1])).unbind(0))
        return [f[k.to(f.device)] for f, k in zip(feats, kept)]

    def feature_inputs(
        self, new_ids: torch.Tensor, pruned: list[torch.Tensor], enc: Encoded, kept: list[torch.Tensor]
    ) -> dict[str, Any]:
        """How the pruned features reach the model: ``mm_encoder_outputs`` (the model skips its
        own image encoding) or ``inputs_embeds`` (features scattered into the placeholders).

        ``new_ids``: ``(B, L')`` shrunk prompt; ``pruned``: per image ``(K_i, D)`` kept features;
        ``enc``/``kept``: the encoding and the kept run positions (for families with more
        per-token features to gather, e.g. Qwen3-VL's deepstack)."""
        if self.feature_passing == "mm_encoder_outputs":
            from transformers.modeling_outputs import BaseModelOutputWithPooling

            return {"mm_encoder_outputs": {"image": BaseModelOutputWithPooling(pooler_output=pruned)}}
        is_img = new_ids == self.image_token_id
        emb = self.model.get_input_embeddings()(new_ids.masked_fill(is_img, self.pad_id))  # ids may be out of vocab
        img = torch.cat(pruned, 0).to(emb.device, emb.dtype)
        return {"inputs_embeds": emb.masked_scatter(is_img.unsqueeze(-1), img)}

    def generate(
        self,
        inputs: Mapping[str, Any],
        *,
        generate_fn: Callable | None = None,
        kept_indices: Sequence | None = None,
        **generate_kwargs,
    ) -> PrunedGeneration:
        """Pruned ``generate``: ``inputs`` (processor outputs) and ``generate_kwargs`` are split
        into what this family prunes and what goes to ``generate_fn`` (default ``model.generate``)
        unchanged. Returns the output (sequences or generate output), the stats and the prompt
        length in the returned sequences (the caller's, or with ``restore_prompt=False`` the
        shrunk prompt's; 0 when ``generate`` returned only the new tokens)."""
        mm, rest = self.split_inputs({**dict(inputs.items()), **generate_kwargs})
        prep = self.prepare(mm, kept_indices)
        gen = generate_fn if generate_fn is not None else self.model.generate
        with count_forward_calls(self.language_model) as calls:
            out = gen(**prep.call, **rest)
        prep.stats.forward_passes = calls[0]
        if self.restore_prompt:
            out = restore_original_prompt(out, prep.input_ids, prep.call["input_ids"])
            return PrunedGeneration(out, prep.stats, prep.input_ids.shape[1])
        return PrunedGeneration(out, prep.stats, shrunk_prompt_length(out, prep.call["input_ids"]))

    def forward(self, inputs: Mapping[str, Any], *, forward_fn: Callable | None = None) -> tuple[Any, TokenStats]:
        """Pruned ``forward`` — exactly the prefill of :meth:`generate`: same shrunk prompt,
        features and positions (``labels`` are shrunk with the prompt, dropped positions
        removed). The output covers the shrunk prompt: ``logits`` is ``(B, L', V)``."""
        mm, rest = self.split_inputs(dict(inputs.items()))
        prep = self.prepare(mm)
        call = prep.call
        if "inputs_embeds" in call:  # forward takes exactly one of input_ids / inputs_embeds
            call = {k: v for k, v in call.items() if k != "input_ids"}
        fwd = forward_fn if forward_fn is not None else self.model.forward
        with count_forward_calls(self.language_model) as calls:
            out = fwd(**call, **rest)
        prep.stats.forward_passes = calls[0]
        return out, prep.stats


# the constructor's keyword options, read once
CORE_OPTIONS = frozenset(
    name for name, p in inspect.signature(FoPruAdapter.__init__).parameters.items() if p.kind is p.KEYWORD_ONLY
)
