"""Named tables of extensions, one shape for every extension point of prunekit.

FoPru model families (``tokenprune.fopru.adapters.ADAPTERS``), diffusion-LLM families
(``tokenprune.localleap.models.FAMILIES``), shard-pipeline selection steps
(``pipelines.shards.STEPS``) and RAG framework adapters (``pipelines.rag.ADAPTERS``) are each a
:class:`Registry`. The rules, stated once:

* :meth:`Registry.register` files an entry under one or more names (a class decorator). A
  name already filed to a *different* entry is a ``ValueError`` naming both, never a silent
  replacement; filing the same entry again (or a reloaded copy of it: same module and
  qualified name) is a no-op.
* :meth:`Registry.discover` imports every module of a package so that their decorators run:
  a new entry is one new file, and no list of imports can forget it.
* :meth:`Registry.register_lazy` files ``"module:attr"``, imported on first lookup, so that an
  optional dependency (a RAG framework) loads only when its entry is asked for.
* :meth:`Registry.available` lists the names (without importing lazy entries), for error
  messages, CLI choices and the contract tests; :meth:`Registry.lookup` is the lookup whose
  error names the unknown entry and the available ones.

A registry is a read-only ``Mapping`` name -> entry (``name in r``, ``r[name]``, ``r.items()``;
looking up a lazy entry imports it). With ``fold_case=True`` names are matched
case-insensitively (``config.json`` spells ``model_type`` "Dream" or "dream"); ``available()``
keeps the spelling they were registered with.

>>> STEPS = Registry("step")
>>> @STEPS.register("random")
... class RandomStep:
...     pass
>>> STEPS.available(), STEPS["random"] is RandomStep
(['random'], True)
>>> STEPS.register("random")(type("Other", (), {}))  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
ValueError: step 'random' is already registered to ...RandomStep; register Other under another name
>>> STEPS.lookup("rnd")
Traceback (most recent call last):
...
ValueError: unknown step 'rnd'; choose from ['random']
"""

from __future__ import annotations

import importlib
import pkgutil
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Generic, TypeVar

__all__ = ["Registry"]

T = TypeVar("T")


def qualified_name(entry: object) -> str:
    """``"package.module.Name"`` of a class or function (``repr`` of anything else)."""
    module, name = getattr(entry, "__module__", None), getattr(entry, "__qualname__", None)
    return f"{module}.{name}" if module and name else repr(entry)


class Registry(Mapping[str, T], Generic[T]):
    """A table ``name -> entry`` of one kind of extension (see the module docstring).

    ``kind`` names the entries in messages ("FoPru family", "selection method").
    """

    def __init__(self, kind: str, *, fold_case: bool = False):
        self.kind = kind
        self.fold_case = fold_case
        self._entries: dict[str, T] = {}
        self._targets: dict[str, str] = {}  # key -> "module:attr" of a lazy entry (imported on first lookup)
        self._spelling: dict[str, str] = {}  # key -> the name as registered

    def _key(self, name: str) -> str:
        if not isinstance(name, str) or not name:
            raise TypeError(f"a {self.kind} name must be a non-empty string, got {name!r}")
        return name.lower() if self.fold_case else name

    def _claim(self, name: str, entry: object) -> str:
        """The key of ``name`` once checked that it is free (or holds ``entry`` already)."""
        key = self._key(name)
        target = self._targets.get(key)
        if target is not None and entry != target and qualified_name(entry) != target.replace(":", "."):
            raise ValueError(f"{self.kind} {name!r} is already registered to {target}; pick another name")
        other = self._entries.get(key)
        if other is not None and qualified_name(other) != qualified_name(entry):
            what = getattr(entry, "__name__", repr(entry))
            raise ValueError(
                f"{self.kind} {name!r} is already registered to {qualified_name(other)}; "
                f"register {what} under another name"
            )
        return key

    def register(self, *names: str) -> Callable[[T], T]:
        """Decorator filing its class (or function) under each of ``names``."""
        if not names:
            raise ValueError(f"register() needs at least one {self.kind} name")

        def add(entry: T) -> T:
            keys = [self._claim(name, entry) for name in names]  # every name checked before any is filed
            for key, name in zip(keys, names):
                self._entries[key] = entry
                self._spelling[key] = name
            return entry

        return add

    def register_lazy(self, name: str, target: str) -> None:
        """File ``target`` (``"package.module:attr"``) under ``name``, imported on first lookup."""
        module, sep, attr = target.partition(":")
        if not (module and sep and attr):
            raise ValueError(f"a lazy {self.kind} is 'package.module:attr', got {target!r}")
        key = self._claim(name, target)
        self._targets[key] = target
        self._spelling[key] = name

    def unregister(self, name: str) -> None:
        """Remove ``name`` (a ``KeyError`` if it is not registered); for tests and plugins."""
        key = self._key(name)
        if key not in self._spelling:
            raise KeyError(name)
        self._entries.pop(key, None)
        self._targets.pop(key, None)
        del self._spelling[key]

    def discover(self, package: str, *, skip: tuple[str, ...] = ()) -> list[str]:
        """Import every module of ``package`` except ``skip`` and ``_private`` ones (their
        decorators register them); returns the imported module names."""
        path = importlib.import_module(package).__path__
        names = [info.name for info in pkgutil.iter_modules(path)]
        wanted = [f"{package}.{name}" for name in sorted(names) if name not in skip and not name.startswith("_")]
        for module in wanted:
            importlib.import_module(module)
        return wanted

    def available(self) -> list[str]:
        """The registered names, sorted, as registered (lazy entries are not imported)."""
        return sorted(self._spelling.values())

    def export_table(self) -> dict[str, str]:
        """``{attr: module}`` of the lazy entries: the table :func:`prunecore.lazy.lazy_exports` takes."""
        return {target.partition(":")[2]: target.partition(":")[0] for target in self._targets.values()}

    def lookup(self, name: str, *, hint: str = "") -> T:
        """The entry under ``name``; a ``ValueError`` naming it and the available ones otherwise
        (``hint``, e.g. how to add one, is appended)."""
        if isinstance(name, str) and name and self._key(name) in self._spelling:
            return self[name]
        raise ValueError(f"unknown {self.kind} {name!r}; choose from {self.available()}" + (f" {hint}" if hint else ""))

    def __getitem__(self, name: str) -> T:
        key = self._key(name) if isinstance(name, str) and name else name
        if key in self._targets and key not in self._entries:
            module, _, attr = self._targets[key].partition(":")
            self._entries[key] = getattr(importlib.import_module(module), attr)
        return self._entries[key]

    def __setitem__(self, name: str, entry: T) -> None:
        """Deprecated (the tables were dicts): ``table[name] = entry`` is :meth:`register`."""
        warnings.warn(
            f"assigning into the {self.kind} table is deprecated: use its register decorator",
            DeprecationWarning,
            stacklevel=2,
        )
        self.register(name)(entry)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and bool(name) and self._key(name) in self._spelling

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._spelling))

    def __len__(self) -> int:
        return len(self._spelling)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self.available())})"
