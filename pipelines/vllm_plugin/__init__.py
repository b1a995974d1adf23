"""FoPru inside ``vllm serve``: a ``vllm.general_plugins`` entry point.

``pip install "prunekit[vllm]"`` next to vLLM, then
``vllm serve Qwen/Qwen2.5-VL-3B-Instruct --hf-overrides '{"prunekit": {"keep": 0.25}}'``.
vLLM calls :func:`register` in every process it starts (API server, engine core, workers);
it swaps the served class of each family in :data:`FAMILIES` for a subclass that prunes
visual tokens after the vision encoder (:mod:`.qwen2_5_vl`, :mod:`.qwen3_vl`), and makes the
model runner place the kept
tokens' M-RoPE positions. On a vLLM version outside :data:`SUPPORTED` it logs one line and
changes nothing. Options and their errors: :mod:`.options`.
"""

from __future__ import annotations

import logging

from prunecore.registry import Registry

__all__ = ["FAMILIES", "SUPPORTED", "is_supported", "register"]

SUPPORTED = ((0, 32),)  # (major, minor) of the vLLM releases this plugin was written and tested against
# vLLM architecture name -> "module:Class" of the pruning subclass (vLLM imports it lazily)
FAMILIES: Registry[str] = Registry("vLLM family")
FAMILIES.register("Qwen2_5_VLForConditionalGeneration")("pipelines.vllm_plugin.qwen2_5_vl:PrunedQwen2_5_VL")
FAMILIES.register("Qwen3VLForConditionalGeneration")("pipelines.vllm_plugin.qwen3_vl:PrunedQwen3VL")
FAMILIES.register("LlavaForConditionalGeneration")("pipelines.vllm_plugin.llava:PrunedLlava")
RUNNERS = ("vllm.v1.worker.gpu_model_runner:GPUModelRunner", "vllm.v1.worker.cpu_model_runner:CPUModelRunner")

logger = logging.getLogger("vllm.prunekit")
state = {"registered": False}


def is_supported(version: str) -> bool:
    """True for a vLLM version whose (major, minor) is in :data:`SUPPORTED`."""
    try:
        major, minor = (int(p) for p in version.split(".")[:2])
    except ValueError:
        return False
    return (major, minor) in SUPPORTED


def prunes_images(model) -> bool:
    """True for a model built by this plugin with ``prunekit`` options set."""
    return getattr(model, "prunekit", None) is not None


def patch_runner(runner_cls) -> None:
    """After ``load_model``, a pruning model gets the runner's M-RoPE recompute (vLLM 0.32
    turns it on only for video pruning, and its CPU runner never does)."""
    load_model = runner_cls.load_model
    if getattr(load_model, "prunekit_patched", False):
        return

    def wrapped(self, *args, **kwargs):
        load_model(self, *args, **kwargs)
        if prunes_images(self.get_model()):
            self.is_multimodal_pruning_enabled = True

    wrapped.prunekit_patched = True
    wrapped.__wrapped__ = load_model
    runner_cls.load_model = wrapped


def register() -> bool:
    """The entry point: idempotent; returns whether the plugin is active in this process."""
    if state["registered"]:
        return True
    import vllm

    if not is_supported(vllm.__version__):
        supported = ", ".join(f"{a}.{b}.x" for a, b in SUPPORTED)
        logger.warning(
            "prunekit vLLM plugin inactive: vLLM %s is not supported (supported: %s); vLLM runs unchanged",
            vllm.__version__,
            supported,
        )
        return False
    from importlib import import_module

    from vllm import ModelRegistry

    for arch in FAMILIES.available():
        ModelRegistry.register_model(arch, FAMILIES[arch])
    for path in RUNNERS:
        module, name = path.split(":")
        patch_runner(getattr(import_module(module), name))
    state["registered"] = True
    logger.info("prunekit vLLM plugin active: FoPru for %s", ", ".join(FAMILIES.available()))
    return True
