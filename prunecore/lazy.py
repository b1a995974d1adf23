"""Lazy package exports: a name is imported from its module on first access, so importing a
package never pulls in heavy libraries (transformers, a RAG framework) it may not need.

A package lists its entry points in ``__all__``, resolves them with :func:`lazy_exports` and
shows them to ``dir()`` (editors, REPL completion) with :func:`lazy_dir`; a ``TYPE_CHECKING``
block imports the same names for type checkers::

    _EXPORTS = {"FoPru": "tokenprune.fopru"}
    if TYPE_CHECKING:
        from .fopru import FoPru
    __all__ = sorted(_EXPORTS)
    __getattr__ = lazy_exports(__name__, _EXPORTS)
    __dir__ = lazy_dir(globals(), _EXPORTS)
"""

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


def lazy_dir(namespace: dict, exports: dict[str, str]) -> Callable[[], list[str]]:
    """A module ``__dir__``: the module's own names (``namespace``: its ``globals()``) plus the
    lazy ``exports``, sorted, so ``dir(package)`` lists entry points not imported yet."""

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(exports))

    return __dir__
