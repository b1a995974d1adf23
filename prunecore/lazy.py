"""Lazy package exports: a name is imported from its module on first access, so importing a
package never pulls in heavy libraries (transformers, a RAG framework) it may not need."""

from __future__ import annotations

from collections.abc import Callable
from importlib import import_module


def lazy_exports(package: str, exports: dict[str, str], *, install_hint: str | None = None) -> Callable:
    """A module ``__getattr__`` resolving ``exports`` (public name -> module path).

    A name equal to its module's last component (``"ftp": "tokenprune.ftp"``) resolves to the
    module itself. ``install_hint`` is added to the message when the module's import fails
    (e.g. ``"pip install 'prunekit[rag]'"``).
    """

    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        path = exports[name]
        try:
            module = import_module(path)
        except ImportError as exc:
            if install_hint is None:
                raise
            raise ImportError(f"{name} needs its optional dependencies: {install_hint} ({exc})") from exc
        return module if path.rsplit(".", 1)[-1] == name else getattr(module, name)

    return __getattr__
