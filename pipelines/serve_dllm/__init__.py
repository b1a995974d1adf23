"""Serve a LLaDA / Dream folder over an OpenAI-compatible HTTP API with continuous batching.

:mod:`.engine` is the framework-free continuous-batching decoder (block-synchronous, exact per
request; each result carries its :class:`~tokenprune.stats.TokenStats`); :mod:`.options` the
per-request decoding options and their checks; :mod:`.text` turns committed blocks into text
deltas (EOS, stop strings, streaming);
:mod:`.metrics` renders Prometheus text; :mod:`.app` is the thin ASGI app (FastAPI + uvicorn).
"""

from .engine import Engine, EngineClosed, QueueFull, Request, RequestResult
from .options import DecodeOptions, check_options

__all__ = ["DecodeOptions", "Engine", "EngineClosed", "QueueFull", "Request", "RequestResult", "check_options"]
