"""The family table: ``config.model_type`` -> FoPru adapter class (a :class:`prunecore.Registry`).

A family module registers its adapter with ``@register("model_type", ...)``; the adapters
package discovers every module beside this one at import time (:meth:`Registry.discover`), so
adding a family is one new file in ``tokenprune/fopru/adapters/`` and no edit elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from prunecore.registry import Registry

__all__ = ["ADAPTERS", "adapter_class", "register", "supported_families"]

ADAPTERS: Registry[type] = Registry("FoPru family (config.model_type)")


def register(*model_types: str) -> Callable[[type], type]:
    """Class decorator: file the adapter under each ``config.model_type`` in ``model_types``
    (a ``model_type`` already filed to another adapter is a ``ValueError``)."""
    file = ADAPTERS.register(*model_types)

    def deco(cls: type) -> type:
        file(cls)
        cls.model_types = tuple(model_types)
        return cls

    return deco


def supported_families() -> str:
    """``"LLaVA (llava), ..."``: the registered families, for error messages and docs."""
    seen: dict[type, list[str]] = {}
    for model_type, cls in sorted(ADAPTERS.items()):
        seen.setdefault(cls, []).append(model_type)
    return ", ".join(f"{cls.family} ({', '.join(types)})" for cls, types in seen.items())


def adapter_class(model: nn.Module) -> type:
    """The adapter registered for ``model.config.model_type``; one clear ``TypeError`` otherwise."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    cls = ADAPTERS.get(model_type)
    if cls is None:
        raise TypeError(
            f"FoPru does not support {type(model).__name__} (config.model_type={model_type!r}). "
            f"Supported families (config.model_type): {supported_families()}. A new family is one "
            "module in tokenprune/fopru/adapters/ registering a FoPruAdapter subclass."
        )
    return cls
