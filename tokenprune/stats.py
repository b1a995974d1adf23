"""One statistics type for every token method (FoPru, FTP, Provence, LocalLeap).

``tokens_in`` counts the tokens the method was offered (visual tokens, routed tokens,
context tokens, generated positions), ``tokens_kept`` those it kept (or, for LocalLeap,
the tokens committed), ``forward_passes`` the model forward calls it made; anything
method-specific goes into ``extras``. Stats add up with ``+`` across calls.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class TokenStats:
    """Counts of one or more pruned calls.

    Attributes:
        method: ``"fopru"``, ``"ftp"``, ``"provence"`` or ``"localleap"``.
        tokens_in: tokens offered to the pruning decision.
        tokens_kept: tokens kept (<= ``tokens_in``).
        forward_passes: model forward calls made.
        extras: method-specific numbers (summed on ``+`` when numeric, else last wins).
    """

    method: str
    tokens_in: int = 0
    tokens_kept: int = 0
    forward_passes: int = 0
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens_saved(self) -> int:
        """Tokens dropped: ``tokens_in - tokens_kept``."""
        return self.tokens_in - self.tokens_kept

    @property
    def keep_ratio(self) -> float:
        """``tokens_kept / tokens_in`` (1.0 when nothing was offered)."""
        return self.tokens_kept / self.tokens_in if self.tokens_in else 1.0

    def __add__(self, other: TokenStats) -> TokenStats:
        if other.method != self.method:
            raise ValueError(f"cannot add {other.method} stats to {self.method} stats")
        extras = dict(self.extras)
        for key, value in other.extras.items():
            mine = extras.get(key)
            numeric = isinstance(value, (int, float)) and isinstance(mine, (int, float))
            extras[key] = mine + value if numeric else value
        return TokenStats(
            self.method,
            self.tokens_in + other.tokens_in,
            self.tokens_kept + other.tokens_kept,
            self.forward_passes + other.forward_passes,
            extras,
        )

    def as_dict(self) -> dict[str, Any]:
        """Flat dict: the counts, ``tokens_saved``, ``keep_ratio`` and the extras."""
        return {
            "method": self.method,
            "tokens_in": self.tokens_in,
            "tokens_kept": self.tokens_kept,
            "tokens_saved": self.tokens_saved,
            "keep_ratio": self.keep_ratio,
            "forward_passes": self.forward_passes,
            **self.extras,
        }
