"""The one deprecation notice: a renamed name, argument or option kept for one release."""

from __future__ import annotations

import warnings


def warn_renamed(old: str, new: str, *, stacklevel: int = 3) -> None:
    """``DeprecationWarning``: ``old`` is deprecated (removed in the next release), use ``new``.

    ``stacklevel`` counts from this function: the default 3 points at the caller's caller (the
    user's line when the caller is the deprecated API itself).
    """
    warnings.warn(
        f"{old} is deprecated and will be removed in the next release: use {new}",
        DeprecationWarning,
        stacklevel=stacklevel,
    )
