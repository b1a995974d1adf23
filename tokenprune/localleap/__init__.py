"""LocalLeap and the diffusion-LLM (dLLM) parallel-decoding family.

Modules: :mod:`.rules` (the pure one-step commit rules: LocalLeap, Fast-dLLM threshold,
LLaDA top-k, EB-sampler), :mod:`.generate` (the block-wise generate loop, NFE counting,
:class:`DecodeResult`), :mod:`.models` (native LLaDA and Dream, loaded without remote code).
"""

from .generate import DecodeResult, localleap_generate
from .models import load_dllm
from .rules import (
    RULES,
    RuleOptions,
    confidence_from_logits,
    eb_sampler,
    fastdllm_threshold,
    llada_schedule,
    llada_topk,
    localleap_transfer,
)

__all__ = [
    "RULES",
    "RuleOptions",
    "DecodeResult",
    "localleap_generate",
    "load_dllm",
    "confidence_from_logits",
    "eb_sampler",
    "fastdllm_threshold",
    "llada_schedule",
    "llada_topk",
    "localleap_transfer",
]
