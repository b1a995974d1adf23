"""Device resolution: CPU always works, a GPU (torch CUDA, faiss-gpu) is used when present."""
from __future__ import annotations

import faiss
import torch


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """Map ``"auto"`` to CUDA when torch sees a GPU, else CPU; pass explicit devices through."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(device, str):
        raise TypeError(f"device must be a str or torch.device, got {type(device).__name__}")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} requested but torch sees no CUDA device")
    return resolved


def faiss_gpu_count() -> int:
    """Number of GPUs faiss can use (0 for faiss-cpu, which lacks the GPU symbols)."""
    if not hasattr(faiss, "StandardGpuResources"):
        return 0
    return int(faiss.get_num_gpus())


def faiss_use_gpu(device: str | torch.device = "auto") -> bool:
    """Whether faiss should run on GPU for this ``device`` request."""
    return resolve_device(device).type == "cuda" and faiss_gpu_count() > 0
