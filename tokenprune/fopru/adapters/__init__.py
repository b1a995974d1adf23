"""FoPru model-family adapters, found by ``config.model_type``.

Every module of this package other than ``base`` and ``registry`` is a family: it subclasses
:class:`~tokenprune.fopru.adapters.base.FoPruAdapter` and registers itself with
:func:`~tokenprune.fopru.adapters.registry.register`. They are imported here by discovery, so
adding a family is one new file.
"""

from __future__ import annotations

import importlib.metadata
import re

from .base import FoPruAdapter
from .registry import ADAPTERS, adapter_class, register, supported_families

__all__ = [
    "ADAPTERS",
    "MIN_TRANSFORMERS",
    "FoPruAdapter",
    "adapter_class",
    "check_transformers_version",
    "make_adapter",
    "register",
    "supported_families",
]

# The lowest transformers the FoPru suite passes on (5.24.0; no older release could be run).
# The adapters rely on APIs of the 5.x line: get_image_features(..., return_dict=True) returning
# an output whose pooler_output is a list per image (4.x returns a list: "'list' object has no
# attribute 'pooler_output'"), forward(mm_encoder_outputs=...), Qwen-VL get_rope_index(...,
# mm_token_type_ids=...) and transformers.vision_utils.get_vision_window_index.
MIN_TRANSFORMERS = "5.24.0"


def _release(version: str) -> tuple[int, ...]:
    """``"5.24.0.dev0"`` -> ``(5, 24, 0)``: the numeric release part (pre-releases count as the release)."""
    match = re.match(r"\d+(?:\.\d+)*", version)
    if match is None:
        raise ImportError(f"cannot read the transformers version {version!r}")
    return tuple(int(part) for part in match.group(0).split("."))


def check_transformers_version(installed: str | None = None) -> None:
    """Raise a clear ``ImportError`` when the installed transformers is older than
    :data:`MIN_TRANSFORMERS` (nothing to check when it is not installed: no model to prune)."""
    if installed is None:
        try:
            installed = importlib.metadata.version("transformers")
        except importlib.metadata.PackageNotFoundError:
            return
    if _release(installed) < _release(MIN_TRANSFORMERS):
        raise ImportError(
            f"FoPru's model adapters need transformers>={MIN_TRANSFORMERS}, found {installed}: "
            f"pip install -U 'transformers>={MIN_TRANSFORMERS}' (the pure functions in tokenprune.fopru.core "
            "work with any version)"
        )


check_transformers_version()

ADAPTERS.discover(__name__, skip=("base", "registry"))


def make_adapter(model, **options) -> FoPruAdapter:
    """The registered adapter of ``model``'s family, built with the FoPru ``options``."""
    return adapter_class(model)(model, **options)
