"""FTP: learned token routing that lets tokens skip LLM blocks (Li et al., arXiv 2412.11494).

Modules: :mod:`.router` (TokenRouter MLP, static and random routers, features),
:mod:`.schedule` (genetic search of per-block sparsities), :mod:`.losses`,
:mod:`.attach` (``attach_ftp``: routed layer wrappers for transformers decoder-only LLMs;
its parts :mod:`.budgets`, :mod:`.state`, :mod:`.decisions`, :mod:`.layer`,
:mod:`.train_forward`, :mod:`.hooks`, :mod:`.handle`), :mod:`.cache` (the compact per-layer
KV cache), :mod:`.train`.
"""

from prunecore.rotary import apply_rotary

from .attach import attach_ftp, detach_ftp, find_decoder, ftp_routing, get_handle
from .budgets import validate_schedule
from .cache import CompactLayer, FTPCache, cache_nbytes
from .handle import FTPHandle
from .layer import RoutedLayer
from .router import (
    RandomRouter,
    RouteInputs,
    Router,
    StaticRouter,
    TokenRouter,
    keep_topk,
    normalised_positions,
    score_ranks,
)

__all__ = [
    "apply_rotary",
    "CompactLayer",
    "FTPCache",
    "cache_nbytes",
    "FTPHandle",
    "RoutedLayer",
    "attach_ftp",
    "detach_ftp",
    "find_decoder",
    "ftp_routing",
    "get_handle",
    "validate_schedule",
    "RandomRouter",
    "RouteInputs",
    "Router",
    "StaticRouter",
    "TokenRouter",
    "keep_topk",
    "normalised_positions",
    "score_ranks",
]
