"""LVLM generate entry point: FoPru visual-token pruning around ``model.generate``.

Thin re-export for :mod:`pipelines.generate`. ``LlavaForConditionalGeneration``,
``LlavaNextForConditionalGeneration`` (any-res; inputs carry ``image_sizes``) and
``Qwen2VLForConditionalGeneration`` (pass ``method="colmean"``: no CLS token) take the same call:

    from pipelines.generate_lvlm import fopru_generate, FoPru
    out, stats = fopru_generate(model, processor(images=img, text=prompt, return_tensors="pt"),
                                keep=0.25, max_new_tokens=32)
    with FoPru(model, keep=0.25) as fp:
        out = model.generate(**inputs, max_new_tokens=32)
    fp.stats.as_dict()   # visual tokens in/out per image, prefill tokens saved
"""

from tokenprune.fopru_hf import FoPru, FoPruStats, fopru_generate, prune_mm_inputs

__all__ = ["FoPru", "FoPruStats", "fopru_generate", "prune_mm_inputs"]
