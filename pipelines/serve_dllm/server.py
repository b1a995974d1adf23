"""``prunekit serve-dllm FOLDER``: load a LLaDA / Dream folder and serve it with uvicorn.

uvicorn handles SIGTERM / SIGINT: it stops accepting connections, lets the in-flight requests
(streams included) finish, then runs the app's shutdown, which drains the engine and exits.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipelines.generate_dllm import resolve_eos_id, resolve_mask_id, resolve_pad_id
from tokenprune.localleap import load_dllm

from .app import ServeSettings, create_app
from .engine import Engine
from .metrics import Metrics
from .options import DecodeOptions, check_options, gen_length_for

__all__ = ["context_length", "build_app", "serve"]

FLOAT64 = ("fp64", "float64", "double")


def context_length(model) -> int | None:
    """The model's context (``max_sequence_length`` for LLaDA, ``max_position_embeddings`` for Dream)."""
    cfg = getattr(model, "config", None)
    for name in ("max_sequence_length", "max_position_embeddings"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def build_app(
    folder,
    *,
    defaults: DecodeOptions | None = None,
    max_tokens: int = 256,
    max_batch: int = 8,
    max_queue: int = 64,
    max_context: int | None = None,
    device="auto",
    dtype="auto",
    model_name: str | None = None,
):
    """Load ``folder`` (native LLaDA / Dream, no remote code) and build the app and its engine.

    ``dtype`` also takes ``"float64"`` (exactness tests). Options are checked here, so a bad
    default fails at start-up, not at the first request. Returns ``(app, engine)``."""
    defaults = defaults or DecodeOptions()
    check_options(defaults, gen_length_for(max_tokens, defaults.block_length))
    model, tokenizer = load_dllm(folder, device=device, dtype=torch.float64 if dtype in FLOAT64 else dtype)
    mask_id = resolve_mask_id(model, tokenizer)
    eos_id = resolve_eos_id(model, tokenizer)
    pad = resolve_pad_id(tokenizer, eos_id, mask_id)
    metrics = Metrics()
    engine = Engine(
        model, mask_id=mask_id, eos_id=eos_id, pad_id=pad, max_batch=max_batch, max_queue=max_queue, metrics=metrics
    )
    settings = ServeSettings(
        model_name=model_name or Path(folder).resolve().name,
        defaults=defaults,
        default_max_tokens=max_tokens,
        max_context=max_context or context_length(model),
    )
    return create_app(engine, tokenizer, settings, metrics), engine


def serve(folder, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info", **kwargs) -> None:
    """Serve ``folder`` until SIGTERM / SIGINT (then drain in-flight requests and return)."""
    import uvicorn

    app, _ = build_app(folder, **kwargs)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=None)
