"""The public import path of the Provence model, its checkpoints and the pruner.

The definitions live in one module per concern: :mod:`.network` (:class:`ProvenceModel`: the
encoder and its heads), :mod:`.checkpoint` (layouts, loading, saving, the window),
:mod:`.budget` (the token budget rule), :mod:`.pruner` (:class:`ProvencePruner`: windowing,
batching, the ``process()`` API) and :mod:`.result` (:class:`ProvenceResult`). This module
re-exports them so that ``from tokenprune.provence.model import ...`` keeps working.
"""

from .checkpoint import (
    FLAT_LAYOUTS,
    MARKER,
    NESTED_LAYOUTS,
    backbone_config,
    check_fast_tokenizer,
    check_window,
    load_provence_model,
    position_limit,
    resolve_checkpoint_dir,
    save_provence_model,
)
from .network import ProvenceModel, rebuild_provence_model
from .pruner import ProvencePruner
from .result import RESULT_KEYS, ProvenceResult

__all__ = [
    "FLAT_LAYOUTS",
    "MARKER",
    "NESTED_LAYOUTS",
    "RESULT_KEYS",
    "ProvenceModel",
    "ProvencePruner",
    "ProvenceResult",
    "backbone_config",
    "check_fast_tokenizer",
    "check_window",
    "load_provence_model",
    "position_limit",
    "rebuild_provence_model",
    "resolve_checkpoint_dir",
    "save_provence_model",
]
