"""Write a tiny random LLaVA-1.5 folder (CLIP tower at 336 px = 576 patches, Llama with
head_dim 64) that vLLM serves on a CPU and transformers loads.

Usage: python tests_vllm/tiny_llava.py FOLDER. The tokenizer is a word-level vocabulary with
LLaVA's ``<image>`` token; the CLIP attention is made peaky (q and k weights scaled) so that
FoPru's CLS scores are well separated and the kept indices of two runtimes compare exactly.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

IMAGE_TOKEN = "<image>"
WORDS = ["<unk>", "</s>", IMAGE_TOKEN, "USER:", "ASSISTANT:", "Describe", "the", "picture", "what", "is", "this"]
PROMPT = "USER: <image> Describe the picture ASSISTANT:"
IMAGE_SIZE = 336  # LLaVA-1.5's crop: 24 x 24 = 576 patches of 14 px


def write_tokenizer(out: Path) -> dict[str, int]:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(WORDS)} | {f"w{i}": i for i in range(len(WORDS), 512)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([IMAGE_TOKEN, "</s>"])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="</s>", unk_token="<unk>")
    fast.save_pretrained(out)
    return vocab


def to_llava_hf_names(weights: Path) -> None:
    """Rename the CLIP tower's weights to the llava-hf checkpoints' ``vision_tower.vision_model.*``
    (what vLLM 0.32 loads; transformers 5.19 saves ``vision_tower.*`` and loads both)."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(weights)
    renamed = {
        k.replace("vision_tower.", "vision_tower.vision_model.", 1)
        if k.startswith("vision_tower.") and not k.startswith("vision_tower.vision_model.")
        else k: v
        for k, v in tensors.items()
    }
    save_file(renamed, weights, metadata={"format": "pt"})


def write_tiny_llava(out: Path, seed: int = 0) -> dict[str, int]:
    """Write config, random safetensors weights, tokenizer and processor to ``out``; returns the special ids."""
    import torch
    from transformers import (
        AutoTokenizer,
        CLIPImageProcessor,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    from tokenprune.fopru.capture import vision_layers

    out.mkdir(parents=True, exist_ok=True)
    vocab = write_tokenizer(out)
    cfg = LlavaConfig(
        vision_config=dict(
            model_type="clip_vision_model",
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=3,
            num_attention_heads=2,
            image_size=IMAGE_SIZE,
            patch_size=14,
            projection_dim=128,
        ),
        text_config=dict(
            model_type="llama",
            vocab_size=512,
            hidden_size=256,
            intermediate_size=512,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=2048,
            pad_token_id=vocab["</s>"],
            bos_token_id=vocab["</s>"],
            eos_token_id=vocab["</s>"],
        ),
        image_token_index=vocab[IMAGE_TOKEN],
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration._from_config(cfg)
    with torch.no_grad():
        for layer in vision_layers(model):
            layer.self_attn.q_proj.weight *= 8.0  # peaky attention: well separated CLS scores
            layer.self_attn.k_proj.weight *= 8.0
    model.save_pretrained(out)
    to_llava_hf_names(out / "model.safetensors")
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=AutoTokenizer.from_pretrained(out),
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    processor.save_pretrained(out)
    return {t: vocab[t] for t in (IMAGE_TOKEN, "</s>")}


if __name__ == "__main__":
    print(json.dumps(write_tiny_llava(Path(sys.argv[1]))))
