"""Native diffusion LLMs, loaded from the published checkpoint layouts without remote code.

:mod:`.base` (shared blocks, the Fast-dLLM caches, the family registry keyed by
``model_type``), :mod:`.llada` (LLaDA 8B / 1.5), :mod:`.dream` (Dream 7B), :mod:`.loading`
(:func:`load_dllm`). A new family is one module registering a :class:`NativeDLLM` subclass
with :func:`register_family`: every module here is imported by discovery, so no other edit.
"""

from .base import FAMILIES, DLLMConfig, DLLMOutput, NativeDLLM, family_for, register_family
from .dream import DreamConfig, DreamModel
from .llada import LLaDAConfig, LLaDAModelLM
from .loading import load_dllm, save_dllm

FAMILIES.discover(__name__, skip=("base", "loading"))

__all__ = [
    "FAMILIES",
    "DLLMConfig",
    "DLLMOutput",
    "NativeDLLM",
    "family_for",
    "register_family",
    "DreamConfig",
    "DreamModel",
    "LLaDAConfig",
    "LLaDAModelLM",
    "load_dllm",
    "save_dllm",
]
