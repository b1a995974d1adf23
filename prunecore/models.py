"""The one model loader: open_clip and transformers models by name or local path.

Device and precision are set here and nowhere else. Nothing is downloaded at import; the
libraries themselves load inside the functions. ``trust_remote_code`` is passed to
transformers explicitly as ``False`` unless the caller turns it on, so a folder's
``auto_map`` code is never executed and transformers never prompts for it.
"""

from __future__ import annotations

import os

import torch

from .device import resolve_device, resolve_dtype


def load_open_clip(
    model_name: str, pretrained: str | None = None, *, device: str = "auto", precision: str = "fp32", **model_kwargs
):
    """Create an open_clip model by name + pretrained tag or local checkpoint path.

    Returns ``(model, preprocess, tokenizer)`` with the model in eval mode on ``device``.
    ``pretrained=None`` gives random weights (tests); a path loads a local checkpoint.
    Unknown model names raise ValueError listing how to see the available ones.
    """
    import open_clip

    if model_name not in open_clip.list_models() and not os.path.exists(str(model_name)):
        raise ValueError(f"unknown open_clip model {model_name!r}; see open_clip.list_models()")
    resolve_dtype(precision)  # a clear error for an unknown precision name
    model, _, preprocess = open_clip.create_model_and_transforms(
        model_name, pretrained=pretrained, device=resolve_device(device), precision=precision, **model_kwargs
    )
    model.eval()
    return model, preprocess, open_clip.get_tokenizer(model_name)


def _auto_class(auto_class):
    if isinstance(auto_class, str):
        import transformers

        if not hasattr(transformers, auto_class):
            raise ValueError(f"transformers has no class {auto_class!r}")
        return getattr(transformers, auto_class)
    return auto_class


def load_transformers(
    name_or_path,
    *,
    auto_class="AutoModel",
    device: str | None = "auto",
    dtype="auto",
    trust_remote_code: bool = False,
    **kwargs,
) -> torch.nn.Module:
    """A transformers model by hub name or local folder, in eval mode on ``device``.

    ``auto_class``: a transformers class or its name (``"AutoModelForCausalLM"``...).
    ``dtype``: a precision name or torch dtype (``"auto"``: bf16 on CUDA, fp32 on CPU).
    ``device=None`` leaves placement to ``kwargs`` (e.g. ``device_map``).
    """
    cls = _auto_class(auto_class)
    model = cls.from_pretrained(
        str(name_or_path), dtype=resolve_dtype(dtype, device or "auto"), trust_remote_code=trust_remote_code, **kwargs
    )
    if device is not None:
        model = model.to(resolve_device(device))
    return model.eval()


def load_tokenizer(name_or_path, *, trust_remote_code: bool = False, **kwargs):
    """The tokenizer of a hub name or local folder (``AutoTokenizer``), no remote code."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(name_or_path), trust_remote_code=trust_remote_code, **kwargs)
