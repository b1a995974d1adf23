"""Embedding helpers: open_clip image/text towers, transformers text encoders.

Models are resolved by name or local path through the library that owns the format; nothing
downloads at import time. Outputs are L2-normalised numpy arrays (n, d) in float32 or
float16 (``out_dtype``). Precomputed arrays are opened with :func:`prunecore.rows.open_embeddings`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .device import resolve_device
from .models import load_open_clip, load_tokenizer, load_transformers

__all__ = [
    "batched",
    "embed_images",
    "embed_pixels",
    "embed_texts_clip",
    "embed_texts_hf",
    "input_dtype",
    "load_hf_encoder",
    "load_open_clip",
    "mean_pool",
]


def batched(items: Iterable, batch_size: int) -> Iterator[list]:
    """Consecutive lists of ``batch_size`` items (the last one shorter)."""
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def _finish(chunks: list[np.ndarray], out_dtype, width: int) -> np.ndarray:
    if not chunks:
        return np.zeros((0, width), dtype=out_dtype)
    return np.concatenate(chunks).astype(out_dtype, copy=False)


def input_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype a model's inputs must have: that of its first conv/linear weight.

    open_clip in fp16/bf16 keeps some parameters (class embedding, norms) in fp32, so the
    first parameter's dtype is not the input dtype.
    """
    for module in model.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            return module.weight.dtype
    return next(model.parameters()).dtype


@torch.inference_mode()
def embed_pixels(model, pixels: torch.Tensor) -> torch.Tensor:
    """``model.encode_image`` of a preprocessed batch (B, 3, H, W) cast to the model's input
    dtype: (B, d) float32 unit rows on the model's device."""
    visual = getattr(model, "visual", model)
    feats = model.encode_image(pixels.to(input_dtype(visual))).float()
    return torch.nn.functional.normalize(feats, dim=-1)


@torch.inference_mode()
def embed_images(
    model,
    images: Iterable,
    preprocess: Callable,
    *,
    batch_size: int = 64,
    device: str = "auto",
    out_dtype=np.float16,
    total: int | None = None,
    progress: bool = True,
) -> np.ndarray:
    """Encode PIL images with an open_clip-style ``model.encode_image``: (n, d) unit rows.

    The model may be in any precision (fp32/fp16/bf16): pixels are cast to its input dtype."""
    dev = resolve_device(device)
    chunks = []
    width = 0
    for batch in tqdm(
        batched(images, batch_size),
        desc="embed images",
        disable=not progress,
        total=None if total is None else -(-total // batch_size),
    ):
        feats = embed_pixels(model, torch.stack([preprocess(im) for im in batch]).to(dev))
        chunks.append(feats.cpu().numpy())
        width = feats.shape[1]
    return _finish(chunks, out_dtype, width)


@torch.inference_mode()
def embed_texts_clip(
    model,
    tokenizer,
    texts: Sequence[str],
    *,
    batch_size: int = 256,
    device: str = "auto",
    out_dtype=np.float16,
    progress: bool = True,
) -> np.ndarray:
    """Encode texts with an open_clip-style ``model.encode_text``: (n, d) unit rows."""
    dev = resolve_device(device)
    chunks = []
    width = 0
    for batch in tqdm(batched(texts, batch_size), desc="embed texts", disable=not progress):
        feats = model.encode_text(tokenizer(list(batch)).to(dev)).float()
        feats = torch.nn.functional.normalize(feats, dim=-1)
        chunks.append(feats.cpu().numpy())
        width = feats.shape[1]
    return _finish(chunks, out_dtype, width)


def load_hf_encoder(
    name_or_path: str, *, device: str = "auto", precision: str = "fp32", trust_remote_code: bool = False
):
    """A transformers encoder + fast tokenizer by hub name or local folder (no remote code)."""
    model = load_transformers(name_or_path, device=device, dtype=precision, trust_remote_code=trust_remote_code)
    return model, load_tokenizer(name_or_path, trust_remote_code=trust_remote_code)


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of token states over non-padding positions: (B, T, H), (B, T) -> (B, H)."""
    weights = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1e-9)


@torch.inference_mode()
def embed_texts_hf(
    model,
    tokenizer,
    texts: Sequence[str],
    *,
    batch_size: int = 64,
    max_length: int = 256,
    device: str = "auto",
    out_dtype=np.float32,
    progress: bool = True,
) -> np.ndarray:
    """Mean-pooled, L2-normalised sentence embeddings (n, H) from a transformers encoder.

    Equals sentence-transformers output for MiniLM-style models (mean pooling + normalise).
    """
    dev = resolve_device(device)
    chunks = []
    for batch in tqdm(batched(texts, batch_size), desc="embed texts", disable=not progress):
        enc = tokenizer(list(batch), padding=True, truncation=True, max_length=max_length, return_tensors="pt").to(dev)
        hidden = model(**enc).last_hidden_state
        pooled = torch.nn.functional.normalize(mean_pool(hidden, enc["attention_mask"]).float(), dim=-1)
        chunks.append(pooled.cpu().numpy())
    return _finish(chunks, out_dtype, int(model.config.hidden_size))
