"""FoPru model-family adapters, found by ``config.model_type``.

Every module of this package other than ``base`` and ``registry`` is a family: it subclasses
:class:`~tokenprune.fopru.adapters.base.FoPruAdapter` and registers itself with
:func:`~tokenprune.fopru.adapters.registry.register`. They are imported here by discovery, so
adding a family is one new file.
"""

from __future__ import annotations

import importlib
import pkgutil

from .base import FoPruAdapter
from .registry import ADAPTERS, adapter_class, register, supported_families

__all__ = ["ADAPTERS", "FoPruAdapter", "adapter_class", "make_adapter", "register", "supported_families"]

for _info in pkgutil.iter_modules(__path__):
    if _info.name not in ("base", "registry"):
        importlib.import_module(f"{__name__}.{_info.name}")


def make_adapter(model, **options) -> FoPruAdapter:
    """The registered adapter of ``model``'s family, built with the FoPru ``options``."""
    return adapter_class(model)(model, **options)
