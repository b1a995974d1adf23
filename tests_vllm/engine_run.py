"""Serve the tiny Qwen2.5-VL with vLLM (offline ``LLM``) and print what the tests check.

Usage: python tests_vllm/engine_run.py FOLDER OPTIONS_JSON. OPTIONS_JSON: ``{"prunekit": {...}}``
(passed as ``hf_overrides``; omitted: plain vLLM) and ``"kept": true`` to also read each
image's kept merged-token indices from the served model (``LLM.apply_model``); ``"family":
"qwen3_vl"`` for Qwen3-VL's image sizes. Prints one line
``RESULT {json}``: prompt token ids and generated ids of a two-request batch, whether the
plugin registered in this (main) process, and the kept indices.
"""

from __future__ import annotations

import json
import sys
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from images import PROMPT, SIZES, SIZES_QWEN3, make_images  # noqa: E402


def kept_indices(model, pixel_values, grid_thw) -> list[list[int]]:
    """Run the served model's image path on preprocessed images; the kept rows carry their
    (t, row, col, extent) positions in the last 4 channels: row * width + col is the index."""
    embeds = model._process_image_input(
        {"type": "pixel_values", "pixel_values": pixel_values, "image_grid_thw": grid_thw}
    )
    merge = model.visual.spatial_merge_size
    out = []
    for emb, (_, _, w) in zip(embeds, grid_thw.tolist()):
        pos = emb[:, -4:].round().long()
        out.append((pos[:, 1] * (w // merge) + pos[:, 2]).tolist())
    return out


def main() -> None:
    from vllm import LLM, SamplingParams

    import pipelines.vllm_plugin as plugin

    folder, options = sys.argv[1], json.loads(sys.argv[2])
    kwargs = {"hf_overrides": {"prunekit": options["prunekit"]}} if "prunekit" in options else {}
    llm = LLM(
        model=folder,
        dtype="float32",
        enforce_eager=True,
        max_model_len=1024,
        gpu_memory_utilization=0.08,  # the CPU backend reads it as a share of the machine's memory
        limit_mm_per_prompt={"image": 2, "video": 0},
        mm_device_do_normalize=False,  # pixels normalised by the processor, as transformers does
        seed=0,
        **kwargs,
    )
    images = make_images(sizes=SIZES_QWEN3 if options.get("family") == "qwen3_vl" else SIZES)
    outs = llm.generate(
        [{"prompt": PROMPT, "multi_modal_data": {"image": im}} for im in images],
        SamplingParams(max_tokens=8, temperature=0),
    )
    result = {
        "prompt_ids": [list(o.prompt_token_ids) for o in outs],
        "output_ids": [list(o.outputs[0].token_ids) for o in outs],
        "registered_in_main": plugin.state["registered"],
    }
    if options.get("kept"):
        from transformers import AutoProcessor

        enc = AutoProcessor.from_pretrained(folder).image_processor(images=images, return_tensors="pt")
        fn = partial(kept_indices, pixel_values=enc["pixel_values"], grid_thw=enc["image_grid_thw"])
        result["kept"] = llm.apply_model(fn)[0]
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
