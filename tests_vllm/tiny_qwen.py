"""Write a tiny random Qwen2.5-VL folder that vLLM serves on a CPU (head_dim 64) and transformers loads.

Usage: python tests_vllm/tiny_qwen.py FOLDER. The tokenizer is a byte-level BPE trained here on
a few sentences, with Qwen's special tokens; the vision attention is made peaky (q and k rows of
every block scaled) so that FoPru's scores are well separated and the kept indices of two
runtimes can be compared exactly.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

SPECIAL = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
TEXT = ["Describe the picture in a few words.", "What is in this image?", "Hello there, what do you see?"] * 20


# Qwen2.5-VL-3B-Instruct's shapes (for timing with vLLM's dummy weights; no weights written)
SHAPE_3B = {
    "vision": dict(
        depth=32,
        hidden_size=1280,
        out_hidden_size=2048,
        intermediate_size=3420,
        num_heads=16,
        fullatt_block_indexes=[7, 15, 23, 31],
    ),
    "text": dict(
        vocab_size=151936,
        hidden_size=2048,
        intermediate_size=11008,
        num_hidden_layers=36,
        num_attention_heads=16,
        num_key_value_heads=2,
        rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1e6},
    ),
}


def write_tokenizer(out: Path) -> dict[str, int]:
    """A byte-level BPE trained on :data:`TEXT` with Qwen's special tokens, saved to ``out``; the special ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(TEXT, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>").save_pretrained(
        out
    )
    return {t: tok.token_to_id(t) for t in SPECIAL}


def text_config(ids: dict[str, int], shape: dict | None, **family) -> dict:
    """The tiny language model's config (``head_dim`` 64 for vLLM's CPU attention), then the
    family's keys, then ``shape``'s text overrides."""
    tiny = dict(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        pad_token_id=ids["<|endoftext|>"],
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|endoftext|>"],
    )
    return {**tiny, **family, **(shape or {}).get("text", {})}


def vision_token_ids(ids: dict[str, int]) -> dict[str, int]:
    """The config's image / video / vision start / vision end token ids."""
    return {
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
    }


def save_config_or_weights(model_cls, cfg, out: Path, seed: int, *, config_only: bool) -> None:
    """Save ``cfg`` alone, or random weights of ``model_cls`` whose vision attention is peaky
    (every block's q and k rows scaled: FoPru's scores well separated)."""
    import torch

    if config_only:
        cfg.save_pretrained(out)
        return
    torch.manual_seed(seed)
    model = model_cls._from_config(cfg)
    with torch.no_grad():
        for block in model.model.visual.blocks:
            block.attn.qkv.weight[: 2 * 64] *= 8.0  # q and k rows (vision hidden size 64)
    model.save_pretrained(out)


def write_tiny_qwen2_5_vl(out: Path, seed: int = 0, shape: dict | None = None) -> dict[str, int]:
    """Write config, random safetensors weights, tokenizer and preprocessor to ``out``; returns the
    special ids. ``shape`` (e.g. :data:`SHAPE_3B`): vision/text config overrides, config only (no
    weights: serve it with ``load_format="dummy"``)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = write_tokenizer(out)
    cfg = Qwen2_5_VLConfig(
        vision_config={
            **dict(
                depth=2,
                hidden_size=64,
                out_hidden_size=256,
                intermediate_size=128,
                num_heads=1,
                patch_size=14,
                spatial_merge_size=2,
                temporal_patch_size=2,
                window_size=112,
                fullatt_block_indexes=[1],
            ),
            **(shape or {}).get("vision", {}),
        },
        text_config=text_config(
            ids, shape, rope_parameters={"rope_type": "default", "mrope_section": [8, 12, 12], "rope_theta": 1e4}
        ),
        **vision_token_ids(ids),
    )
    save_config_or_weights(Qwen2_5_VLForConditionalGeneration, cfg, out, seed, config_only=shape is not None)
    preprocessor = {
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2_5_VLProcessor",
        "patch_size": 14,
        "merge_size": 2,
        "temporal_patch_size": 2,
        "min_pixels": 3136,
        "max_pixels": 200704,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
    }
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    return ids


# Qwen3-VL-2B-Instruct's shapes (for timing with vLLM's dummy weights; no weights written)
SHAPE_QWEN3_2B = {
    "vision": dict(
        depth=24,
        hidden_size=1024,
        out_hidden_size=2048,
        intermediate_size=4096,
        num_heads=16,
        num_position_embeddings=2304,
        deepstack_visual_indexes=[5, 11, 17],
    ),
    "text": dict(
        vocab_size=151936,
        hidden_size=2048,
        intermediate_size=6144,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        rope_parameters={
            "rope_type": "default",
            "mrope_section": [24, 20, 20],
            "mrope_interleaved": True,
            "rope_theta": 5e6,
        },
    ),
}


def write_tiny_qwen3_vl(out: Path, seed: int = 0, shape: dict | None = None) -> dict[str, int]:
    """A tiny random Qwen3-VL (3 vision blocks, deepstack after blocks 0 and 1, patch 16) like
    :func:`write_tiny_qwen2_5_vl` (``shape``, e.g. :data:`SHAPE_QWEN3_2B`: config only); returns
    the special ids."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    ids = write_tokenizer(out)
    cfg = Qwen3VLConfig(
        vision_config={
            **dict(
                depth=3,
                hidden_size=64,
                out_hidden_size=256,
                intermediate_size=128,
                num_heads=1,
                patch_size=16,
                spatial_merge_size=2,
                temporal_patch_size=2,
                num_position_embeddings=256,
                deepstack_visual_indexes=[0, 1],
            ),
            **(shape or {}).get("vision", {}),
        },
        text_config=text_config(
            ids,
            shape,
            head_dim=64,
            rope_parameters={
                "rope_type": "default",
                "mrope_section": [16, 8, 8],
                "mrope_interleaved": True,
                "rope_theta": 1e4,
            },
        ),
        **vision_token_ids(ids),
    )
    save_config_or_weights(Qwen3VLForConditionalGeneration, cfg, out, seed, config_only=shape is not None)
    common = {
        "patch_size": 16,
        "merge_size": 2,
        "temporal_patch_size": 2,
        "image_mean": [0.5] * 3,
        "image_std": [0.5] * 3,
    }
    pixels = {"size": {"shortest_edge": 4096, "longest_edge": 262144}}
    image = {"image_processor_type": "Qwen2VLImageProcessorFast", "processor_class": "Qwen3VLProcessor"}
    (out / "preprocessor_config.json").write_text(json.dumps({**image, **common, **pixels}))
    video = {"video_processor_type": "Qwen3VLVideoProcessor", "processor_class": "Qwen3VLProcessor"}
    (out / "video_preprocessor_config.json").write_text(json.dumps({**video, **common, **pixels}))
    return ids


if __name__ == "__main__":
    print(json.dumps(write_tiny_qwen2_5_vl(Path(sys.argv[1]))))
