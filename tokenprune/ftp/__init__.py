"""FTP: learned token routing that lets tokens skip LLM blocks (Li et al., arXiv 2412.11494).

Modules: :mod:`.router` (TokenRouter MLP, static and random routers, features),
:mod:`.schedule` (genetic search of per-block sparsities), :mod:`.losses`,
:mod:`.attach` (routed layer wrappers for transformers decoder-only LLMs), :mod:`.cache`
(the compact per-layer KV cache), :mod:`.train`.
"""

from .attach import (
    FTPHandle,
    RoutedLayer,
    apply_rotary,
    attach_ftp,
    detach_ftp,
    find_decoder,
    ftp_routing,
    get_handle,
    validate_schedule,
)
from .cache import CompactLayer, FTPCache, cache_nbytes
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
