"""The tiny LLaVA under both runtimes, for tests_vllm/test_vllm_llava.py.

``python tests_vllm/llava_run.py engine FOLDER OPTIONS_JSON`` (vLLM environment): serve it with
vLLM's offline ``LLM`` (``OPTIONS_JSON``: ``{"prunekit": {...}}`` passed as ``hf_overrides``,
omitted: plain vLLM; ``"kept": true`` also reads each image's kept patch indices from the
served model) and print ``RESULT {json}``: prompt and generated token ids of a two-request
batch, whether the plugin registered in this process, the kept indices.
``python tests_vllm/llava_run.py reference FOLDER KEEP`` (main environment): print the JSON list
of the patch indices ``tokenprune.FoPru`` keeps for the same images.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from images import make_images  # noqa: E402
from tiny_llava import PROMPT  # noqa: E402


def pixel_values(folder: str):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(folder).image_processor(images=make_images(), return_tensors="pt")[
        "pixel_values"
    ]


def served_kept_rows(model, pixels) -> list[list[int]]:
    """Which rows of the unpruned image embeddings the served model returns, per image: each
    returned row is matched to the nearest unpruned row (the model's output, not its selection)."""
    import torch
    from vllm.model_executor.models.llava import LlavaForConditionalGeneration

    image_input = {"type": "pixel_values", "pixel_values": pixels}
    pruned = model._process_image_input(image_input)
    full = LlavaForConditionalGeneration._process_image_input(model, image_input)
    return [torch.cdist(p.float(), f.float()).argmin(dim=1).tolist() for p, f in zip(pruned, full)]


def engine(folder: str, options: dict) -> dict:
    from functools import partial

    from vllm import LLM, SamplingParams

    import pipelines.vllm_plugin as plugin

    kwargs = {"hf_overrides": {"prunekit": options["prunekit"]}} if "prunekit" in options else {}
    llm = LLM(
        model=folder,
        dtype="float32",
        enforce_eager=True,
        max_model_len=1024,
        gpu_memory_utilization=0.08,  # the CPU backend reads it as a share of the machine's memory
        limit_mm_per_prompt={"image": 1},
        distributed_executor_backend="uni",  # the worker in the engine process: one start-up fewer
        seed=0,
        **kwargs,
    )
    outs = llm.generate(
        [{"prompt": PROMPT, "multi_modal_data": {"image": im}} for im in make_images()],
        SamplingParams(max_tokens=8, temperature=0),
    )
    result = {
        "prompt_ids": [list(o.prompt_token_ids) for o in outs],
        "output_ids": [list(o.outputs[0].token_ids) for o in outs],
        "registered_in_main": plugin.state["registered"],
    }
    if options.get("kept"):
        result["kept"] = llm.apply_model(partial(served_kept_rows, pixels=pixel_values(folder)))[0]
    return result


def reference(folder: str, keep: float) -> list[list[int]]:
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from tokenprune import FoPru

    model = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(folder)
    kept = []
    for image in make_images():
        enc = processor(text=[PROMPT], images=[image], return_tensors="pt")
        with FoPru(model, keep=keep) as fopru, torch.no_grad():
            model(**enc)
        kept += [k.tolist() for k in fopru.stats.extras["kept_indices"]]
    return kept


if __name__ == "__main__":
    mode, folder, arg = sys.argv[1:4]
    if mode == "engine":
        print("RESULT " + json.dumps(engine(folder, json.loads(arg))), flush=True)
    else:
        print(json.dumps(reference(folder, float(arg))))
