"""Devices and dtypes: CPU always works, a GPU (torch CUDA, faiss-gpu) is used when present.

faiss is imported only inside :func:`faiss_gpu_count`, so importing this module is light.
"""

from __future__ import annotations

import torch

_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """Map ``"auto"``/``None`` to CUDA when torch sees a GPU, else CPU; check explicit ones."""
    if isinstance(device, torch.device):
        return device
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(device, str):
        raise TypeError(f"device must be a str or torch.device, got {type(device).__name__}")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} requested but torch sees no CUDA device; pass device='cpu' or 'auto'")
    return resolved


def resolve_dtype(dtype: str | torch.dtype | None = "auto", device: str | torch.device | None = "auto") -> torch.dtype:
    """A precision name (``fp32``/``fp16``/``bf16`` or the torch names) or dtype -> torch dtype.

    ``"auto"``/``None``: bf16 on a CUDA device that supports it (fp16 otherwise), fp32 on CPU.
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        if resolve_device(device).type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"unknown precision {dtype!r}; expected one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def faiss_gpu_count() -> int:
    """Number of GPUs faiss can use (0 for faiss-cpu, which lacks the GPU symbols)."""
    import faiss

    if not hasattr(faiss, "StandardGpuResources"):
        return 0
    return int(faiss.get_num_gpus())


def faiss_use_gpu(device: str | torch.device = "auto") -> bool:
    """Whether faiss should run on GPU for this ``device`` request."""
    return resolve_device(device).type == "cuda" and faiss_gpu_count() > 0
