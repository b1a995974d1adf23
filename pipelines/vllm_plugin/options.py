"""The plugin's options, read from the served model's config (no vLLM import here).

``vllm serve MODEL --hf-overrides '{"prunekit": {"keep": 0.25}}'`` (or
``LLM(MODEL, hf_overrides={"prunekit": {...}})``) puts a ``prunekit`` dict on the Hugging Face
config that every vLLM process sees; :func:`read_options` turns it into :class:`ServeOptions`
with one-line errors that name the option and the fix. No ``prunekit`` key: the plugin's
classes behave exactly as vLLM's own.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

from prunecore.budget import check_keep, keep_count

__all__ = ["OPTION_KEY", "ServeOptions", "read_options", "served_token_count"]

OPTION_KEY = "prunekit"
KNOWN = ("keep", "method", "layer", "strategy")
METHODS = ("colmean",)  # the served towers (Qwen-VL) have no CLS token
STRATEGIES = ("rank", "row")


class OptionError(ValueError):
    """A bad ``prunekit`` option: the message is one line naming the option and the fix."""


@dataclass(frozen=True)
class ServeOptions:
    """FoPru options of a served model.

    ``keep``: a fraction in (0, 1] of each image's merged tokens, or an int count per image
    (an image with fewer tokens keeps them all). ``layer``: the vision block to score from,
    indexed like ``hidden_states`` as in :class:`tokenprune.FoPru` (``None``: the family's
    default). ``method``: the family's scoring rule (``"colmean"`` for Qwen-VL, ``"cls"`` for
    LLaVA's CLIP tower: see ``read_options(methods=...)``). ``strategy``: ``"rank"`` or ``"row"``.
    """

    keep: float | int
    method: str = "colmean"
    layer: int | None = None
    strategy: str = "rank"


def _fail(what: str, fix: str) -> OptionError:
    return OptionError(f"prunekit vLLM plugin: {what}; {fix}")


def read_options(hf_config, methods: tuple[str, ...] = METHODS) -> ServeOptions | None:
    """The :class:`ServeOptions` of ``hf_config`` (its ``prunekit`` attribute), or None when unset.
    ``methods``: the scoring rules of the family's tower (the first is its default)."""
    raw = getattr(hf_config, OPTION_KEY, None)
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise _fail(f"'{OPTION_KEY}' must be a JSON object, got {raw!r}", 'pass e.g. {"prunekit": {"keep": 0.25}}')
    unknown = sorted(set(raw) - set(KNOWN))
    if unknown:
        raise _fail(f"unknown option(s) {unknown}", f"use only {list(KNOWN)}")
    if "keep" not in raw:
        raise _fail("'keep' is missing", 'pass e.g. {"prunekit": {"keep": 0.25}} (a fraction in (0, 1] or a count)')
    keep = raw["keep"]
    try:
        check_keep(keep)
    except (TypeError, ValueError) as e:
        raise _fail(f"keep={keep!r} is invalid ({e})", "pass a fraction in (0, 1] or an int count >= 1") from None
    if isinstance(keep, numbers.Integral) and keep < 1:
        raise _fail(f"keep={keep!r} keeps no token", "pass a fraction in (0, 1] or an int count >= 1")
    method = raw.get("method", methods[0])
    if method not in methods:
        raise _fail(f"method={method!r} is not supported by the served towers", f"use one of {list(methods)}")
    strategy = raw.get("strategy", "rank")
    if strategy not in STRATEGIES:
        raise _fail(f"strategy={strategy!r} is unknown", f"use one of {list(STRATEGIES)}")
    layer = raw.get("layer")
    if layer is not None and (isinstance(layer, bool) or not isinstance(layer, numbers.Integral)):
        raise _fail(f"layer={layer!r} is not an int", "pass a vision block index (hidden_states indexing) or omit it")
    return ServeOptions(keep=keep, method=method, layer=layer, strategy=strategy)


def served_token_count(n: int, keep: float | int) -> int:
    """Tokens kept of an image's ``n`` merged tokens: the one budget rule, a count capped at
    ``n``, and at least one token (a server cannot refuse a small image the way ``FoPru``
    refuses a budget that keeps nothing)."""
    if isinstance(keep, numbers.Integral):
        keep = min(int(keep), n)
    return max(1, keep_count(n, keep))
