"""Serve a LLaDA / Dream folder over an OpenAI-compatible HTTP API with continuous batching.

:mod:`.engine` is the framework-free continuous-batching decoder (block-synchronous, exact per
request); :mod:`.text` turns committed blocks into text deltas (EOS, stop strings, streaming);
:mod:`.metrics` renders Prometheus text; :mod:`.app` is the thin ASGI app (FastAPI + uvicorn).
"""

from .engine import DecodeOptions, Engine, EngineClosed, QueueFull, Request, RequestResult, check_options

__all__ = ["DecodeOptions", "Engine", "EngineClosed", "QueueFull", "Request", "RequestResult", "check_options"]
