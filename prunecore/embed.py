"""Embedding helpers: open_clip image/text towers, transformers text encoders.

Models are resolved by name or local path through the library that owns the format; nothing
downloads at import time. Outputs are L2-normalised numpy arrays (n, d) in float32 or
float16 (``out_dtype``). Precomputed arrays are opened with :func:`prunecore.rows.open_embeddings`.
"""
from __future__ import annotations

import os
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .device import resolve_device

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _torch_dtype(precision: str) -> torch.dtype:
    if precision not in _DTYPES:
        raise ValueError(f"precision must be one of {sorted(_DTYPES)}, got {precision!r}")
    return _DTYPES[precision]


def _batched(items: Iterable, batch_size: int) -> Iterable[list]:
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


def load_open_clip(model_name: str, pretrained: str | None = None, *, device: str = "auto",
                   precision: str = "fp32", **model_kwargs):
    """Create an open_clip model by name + pretrained tag or local checkpoint path.

    Returns ``(model, preprocess, tokenizer)`` with the model in eval mode on ``device``.
    ``pretrained=None`` gives random weights (tests); a path loads a local checkpoint.
    Unknown model names raise ValueError listing how to see the available ones.
    """
    import open_clip

    if model_name not in open_clip.list_models() and not os.path.exists(str(model_name)):
        raise ValueError(f"unknown open_clip model {model_name!r}; see open_clip.list_models()")
    dev = resolve_device(device)
    model, _, preprocess = open_clip.create_model_and_transforms(
        model_name, pretrained=pretrained, device=dev, precision=precision, **model_kwargs)
    model.eval()
    return model, preprocess, open_clip.get_tokenizer(model_name)


@torch.inference_mode()
def embed_images(model, images: Iterable, preprocess: Callable, *, batch_size: int = 64,
                 device: str = "auto", out_dtype=np.float16, total: int | None = None,
                 progress: bool = True) -> np.ndarray:
    """Encode PIL images with an open_clip-style ``model.encode_image``: (n, d) unit rows."""
    dev = resolve_device(device)
    chunks = []
    width = 0
    for batch in tqdm(_batched(images, batch_size), desc="embed images", disable=not progress,
                      total=None if total is None else -(-total // batch_size)):
        pixels = torch.stack([preprocess(im) for im in batch]).to(dev)
        pixels = pixels.to(next(model.parameters()).dtype)
        feats = model.encode_image(pixels).float()
        feats = torch.nn.functional.normalize(feats, dim=-1)
        chunks.append(feats.cpu().numpy())
        width = feats.shape[1]
    return _finish(chunks, out_dtype, width)


@torch.inference_mode()
def embed_texts_clip(model, tokenizer, texts: Sequence[str], *, batch_size: int = 256,
                     device: str = "auto", out_dtype=np.float16,
                     progress: bool = True) -> np.ndarray:
    """Encode texts with an open_clip-style ``model.encode_text``: (n, d) unit rows."""
    dev = resolve_device(device)
    chunks = []
    width = 0
    for batch in tqdm(_batched(texts, batch_size), desc="embed texts", disable=not progress):
        feats = model.encode_text(tokenizer(list(batch)).to(dev)).float()
        feats = torch.nn.functional.normalize(feats, dim=-1)
        chunks.append(feats.cpu().numpy())
        width = feats.shape[1]
    return _finish(chunks, out_dtype, width)


def load_hf_encoder(name_or_path: str, *, device: str = "auto", precision: str = "fp32",
                    trust_remote_code: bool = False):
    """Load a transformers encoder + fast tokenizer by hub name or local folder.

    ``trust_remote_code`` stays off unless the caller turns it on.
    """
    from transformers import AutoModel, AutoTokenizer

    dev = resolve_device(device)
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    model = AutoModel.from_pretrained(name_or_path, trust_remote_code=trust_remote_code,
                                      dtype=_torch_dtype(precision))
    return model.to(dev).eval(), tokenizer


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of token states over non-padding positions: (B, T, H), (B, T) -> (B, H)."""
    weights = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1e-9)


@torch.inference_mode()
def embed_texts_hf(model, tokenizer, texts: Sequence[str], *, batch_size: int = 64,
                   max_length: int = 256, device: str = "auto", out_dtype=np.float32,
                   progress: bool = True) -> np.ndarray:
    """Mean-pooled, L2-normalised sentence embeddings (n, H) from a transformers encoder.

    Equals sentence-transformers output for MiniLM-style models (mean pooling + normalise).
    """
    dev = resolve_device(device)
    chunks = []
    for batch in tqdm(_batched(texts, batch_size), desc="embed texts", disable=not progress):
        enc = tokenizer(list(batch), padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt").to(dev)
        hidden = model(**enc).last_hidden_state
        pooled = torch.nn.functional.normalize(mean_pool(hidden, enc["attention_mask"]).float(),
                                               dim=-1)
        chunks.append(pooled.cpu().numpy())
    return _finish(chunks, out_dtype, int(model.config.hidden_size))
