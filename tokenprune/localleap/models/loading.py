"""``load_dllm(folder)``: a native LLaDA or Dream from a local checkpoint folder, no remote code.

The folder's ``config.json`` ``model_type`` picks the family (:data:`.base.FAMILIES`); its
``auto_map`` is never executed. Weights are read from ``model.safetensors`` or the shards named
by ``model.safetensors.index.json`` (:func:`prunecore.models.read_safetensors`: a truncated
file, a bad index or a NaN / infinite weight is a clear error naming the file) into a model
built on the meta device (no random init of 8B parameters), with a strict key check. A bad
``config.json`` (not JSON, no ``model_type``, no ``mask_token_id``, an unsupported option) is an
error naming it at load. The tokenizer loads with ``trust_remote_code=False``;
Dream's tokenizer class (``DreamTokenizer``, remote code) is read as the Qwen2 BPE tokenizer
whose files it ships (``vocab.json``, ``merges.txt``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from prunecore.device import resolve_device, resolve_dtype
from prunecore.models import CheckpointError, load_tokenizer, read_json, read_safetensors, save_safetensors_folder

from .base import NativeDLLM, family_for

__all__ = ["load_dllm", "load_dllm_model", "save_dllm", "read_safetensors", "TOKENIZER_FALLBACKS"]

# model_type (lower case) -> transformers tokenizer class that reads the family's tokenizer files
TOKENIZER_FALLBACKS = {"dream": "Qwen2Tokenizer"}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def load_dllm_model(folder, *, device="auto", dtype="auto") -> NativeDLLM:
    """The native model of ``folder`` (eval mode) on ``device`` in ``dtype`` (``auto``: fp32 on CPU, bf16 on GPU)."""
    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{folder} has no config.json; pass a checkpoint folder of LLaDA or Dream")
    values = read_json(cfg_path)
    if "model_type" not in values:
        raise CheckpointError(f"{cfg_path} has no model_type; expected 'llada' or 'Dream'")
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    try:
        cls = family_for(values["model_type"])
        with torch.device("meta"):
            model = cls.from_config(values)
    except ValueError as exc:  # the config's own checks: name the file they are about
        raise CheckpointError(f"{cfg_path}: {exc}") from None
    state = read_safetensors(folder)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{folder} does not hold a {cls.model_type} checkpoint in the published layout: "
            f"missing keys {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected keys {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    shapes = model.state_dict()
    wrong = [k for k in sorted(state) if state[k].shape != shapes[k].shape]
    if wrong:
        k = wrong[0]
        raise CheckpointError(
            f"{folder}: {len(wrong)} weight(s) do not have the shape {cfg_path} implies (first: {k} is "
            f"{tuple(state[k].shape)}, expected {tuple(shapes[k].shape)}): the config and the weights come from "
            "different checkpoints"
        )
    state = {k: v.to(device=dev, dtype=dt) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def save_dllm(model: NativeDLLM, folder) -> Path:
    """Write a native model as a checkpoint folder in its family's published layout.

    ``config.json`` (the config's fields, ``model_type`` and ``architectures``) and
    ``model.safetensors`` (the published key names), both written atomically
    (:func:`prunecore.models.save_safetensors_folder`). Returns the folder.
    """
    values = {**model.config.to_dict(), "model_type": model.model_type, "architectures": [type(model).__name__]}
    return save_safetensors_folder(folder, model.state_dict(), values)


def load_family_tokenizer(folder: Path, model_type: str):
    """The folder's tokenizer without remote code, or None when it ships no tokenizer files."""
    if not any((folder / name).exists() for name in _TOKENIZER_FILES):
        return None
    fallback = TOKENIZER_FALLBACKS.get(model_type.lower())
    if fallback is not None:
        import transformers

        return getattr(transformers, fallback).from_pretrained(str(folder))
    return load_tokenizer(folder)


def load_dllm(folder, *, device="auto", dtype="auto"):
    """Load a LLaDA or Dream checkpoint folder natively: ``(model, tokenizer)``.

    Args:
        folder: local folder with ``config.json`` (``model_type`` ``"llada"`` or ``"Dream"``),
            safetensors weights in the published key layout and (optionally) tokenizer files.
        device, dtype: where and in which precision (``"auto"``: CUDA + bf16 when present,
            else CPU + fp32).
    Returns:
        ``(model, tokenizer)``; the tokenizer is None when the folder has no tokenizer files.
        ``model.config.mask_token_id`` is the checkpoint's; ``model.shift_logits`` is True for Dream.
    """
    model = load_dllm_model(folder, device=device, dtype=dtype)
    return model, load_family_tokenizer(Path(folder), model.model_type)
