"""One result type for every token method's ``generate`` entry point.

:func:`tokenprune.fopru_generate`, :func:`pipelines.ftp_generate` and
:func:`pipelines.dllm_generate` return a :class:`Generation`:

* ``sequences`` — ``(B, P + T)`` int64 token ids, **the prompt included**: the (left-padded)
  prompt of length ``P`` followed by the ``T`` generated positions, exactly as
  ``model.generate`` returns them; ``generated`` is ``sequences[:, P:]``;
* ``texts`` — one decoded continuation per row (the generated part only, cut at the first
  end-of-sequence token); an empty list when no tokenizer was available to decode;
* ``stats`` — one :class:`~tokenprune.stats.TokenStats` for the whole call
  (``forward_passes`` = forward passes of the model being accelerated).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .stats import TokenStats

__all__ = ["Generation", "decode_continuations"]


@dataclass
class Generation:
    """The output of a pruned ``generate`` call.

    Attributes:
        sequences: ``(B, P + T)`` int64 ids: prompt (left-padded to ``P``) + generated tokens.
        texts: ``B`` decoded continuations (generated part only), or ``[]`` without a tokenizer.
        stats: the call's :class:`~tokenprune.stats.TokenStats`.
        prompt_length: ``P``, where the generated part starts in ``sequences``.
    """

    sequences: torch.Tensor
    texts: list[str] = field(default_factory=list)
    stats: TokenStats = field(default_factory=lambda: TokenStats("unknown"))
    prompt_length: int = 0

    @property
    def generated(self) -> torch.Tensor:
        """``(B, T)`` the generated part of ``sequences`` (a view)."""
        return self.sequences[:, self.prompt_length :]


def decode_continuations(tokenizer, generated: torch.Tensor, eos_ids, *, skip_special_tokens: bool = True) -> list[str]:
    """One text per row of ``generated`` ``(B, T)``, cut before the first of ``eos_ids``.

    ``tokenizer``: anything with ``decode`` (a tokenizer, or a processor that delegates to its
    tokenizer); ``eos_ids``: the end-of-sequence ids (an empty collection: no cut). One host
    read of ``generated``, one ``decode`` per row.
    """
    stop = {int(e) for e in eos_ids}
    texts = []
    for row in generated.tolist():
        cut = next((i for i, t in enumerate(row) if t in stop), len(row))
        texts.append(tokenizer.decode(row[:cut], skip_special_tokens=skip_special_tokens))
    return texts
