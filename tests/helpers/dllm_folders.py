"""Random-weight checkpoint folders in the published LLaDA and Dream layouts (tiny sizes).

The config fields and safetensors key names are written out here from the published releases
(``shared/specs/checkpoints.md``), independently of the native model code under test.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

LLADA_CONFIG = {
    "model_type": "llada",
    "architectures": ["LLaDAModelLM"],
    "auto_map": {
        "AutoConfig": "configuration_llada.LLaDAConfig",
        "AutoModel": "modeling_llada.LLaDAModelLM",
        "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
    },
    "d_model": 32,
    "n_layers": 2,
    "n_heads": 4,
    "n_kv_heads": 4,
    "mlp_hidden_size": 48,
    "mlp_ratio": 4,
    "vocab_size": 48,
    "embedding_size": 48,
    "mask_token_id": 44,
    "eos_token_id": 43,
    "pad_token_id": 43,
    "rope": True,
    "rope_theta": 500000.0,
    "rope_full_precision": True,
    "rms_norm_eps": 1e-05,
    "layer_norm_type": "rms",
    "layer_norm_with_affine": True,
    "bias_for_layer_norm": False,
    "activation_type": "silu",
    "block_type": "llama",
    "weight_tying": False,
    "include_bias": False,
    "include_qkv_bias": False,
    "scale_logits": False,
    "input_emb_norm": False,
    "alibi": False,
    "block_group_size": 1,
    "max_sequence_length": 4096,
    "torch_dtype": "bfloat16",
}

DREAM_CONFIG = {
    "model_type": "Dream",
    "architectures": ["DreamModel"],
    "auto_map": {"AutoConfig": "configuration_dream.DreamConfig", "AutoModel": "modeling_dream.DreamModel"},
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 64,
    "mask_token_id": 60,
    "bos_token_id": 59,
    "eos_token_id": 59,
    "pad_token_id": 59,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "max_position_embeddings": 131072,
    "attention_dropout": 0.0,
    "use_sliding_window": False,
    "torch_dtype": "bfloat16",
}

WORDS = [f"w{i}" for i in range(40)]


def llada_keys(c: dict) -> dict[str, tuple[int, ...]]:
    """Published LLaDA key names -> shapes."""
    d, hd = c["d_model"], c["d_model"] // c["n_heads"]
    kv, m, v = c["n_kv_heads"] * hd, c["mlp_hidden_size"], c["embedding_size"]
    keys = {"model.transformer.wte.weight": (v, d)}
    for n in range(c["n_layers"]):
        p = f"model.transformer.blocks.{n}."
        keys.update(
            {
                p + "attn_norm.weight": (d,),
                p + "q_proj.weight": (d, d),
                p + "k_proj.weight": (kv, d),
                p + "v_proj.weight": (kv, d),
                p + "attn_out.weight": (d, d),
                p + "ff_norm.weight": (d,),
                p + "ff_proj.weight": (m, d),
                p + "up_proj.weight": (m, d),
                p + "ff_out.weight": (d, m),
            }
        )
    keys["model.transformer.ln_f.weight"] = (d,)
    keys["model.transformer.ff_out.weight"] = (v, d)
    return keys


def dream_keys(c: dict) -> dict[str, tuple[int, ...]]:
    """Published Dream (Qwen2) key names -> shapes."""
    d, hd = c["hidden_size"], c["hidden_size"] // c["num_attention_heads"]
    kv, m, v = c["num_key_value_heads"] * hd, c["intermediate_size"], c["vocab_size"]
    keys = {"model.embed_tokens.weight": (v, d)}
    for n in range(c["num_hidden_layers"]):
        p = f"model.layers.{n}."
        keys.update(
            {
                p + "input_layernorm.weight": (d,),
                p + "self_attn.q_proj.weight": (d, d),
                p + "self_attn.q_proj.bias": (d,),
                p + "self_attn.k_proj.weight": (kv, d),
                p + "self_attn.k_proj.bias": (kv,),
                p + "self_attn.v_proj.weight": (kv, d),
                p + "self_attn.v_proj.bias": (kv,),
                p + "self_attn.o_proj.weight": (d, d),
                p + "post_attention_layernorm.weight": (d,),
                p + "mlp.gate_proj.weight": (m, d),
                p + "mlp.up_proj.weight": (m, d),
                p + "mlp.down_proj.weight": (d, m),
            }
        )
    keys["model.norm.weight"] = (d,)
    keys["lm_head.weight"] = (v, d)
    return keys


HEAD_SCALE = {"llada": 40.0, "dream": 8.0}  # a mix of confident and unsure proposals at these sizes


def random_weights(keys: dict, seed: int, head_scale: float) -> dict[str, torch.Tensor]:
    """Norms ~ 1 + 0.1 N, biases 0.1 N, matrices N / sqrt(fan_in); heads scaled up so the
    random model is confident somewhere (the commit rules then have something to decide)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in keys.items():
        t = torch.randn(shape, generator=g)
        if "norm" in name:
            t = 1 + 0.1 * t
        elif name.endswith("bias"):
            t = 0.1 * t
        elif "wte" in name or "embed_tokens" in name:
            pass
        else:
            t = t / shape[-1] ** 0.5
            if name in ("lm_head.weight", "model.transformer.ff_out.weight"):
                t = t * head_scale
        out[name] = t.contiguous()
    return out


def write_llada_tokenizer(folder: Path, c: dict) -> None:
    """A word-level ``tokenizer.json`` with the LLaDA special-token roles at the config's ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(WORDS)}
    specials = {c["eos_token_id"]: "<|endoftext|>", c["mask_token_id"]: "<|mdm_mask|>"}
    for i in range(len(WORDS), c["vocab_size"]):
        vocab[specials.get(i, f"<|reserved_{i}|>")] = i
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|reserved_40|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(folder / "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "mask_token": "<|mdm_mask|>",
        "unk_token": "<|reserved_40|>",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))


def write_dream_tokenizer(folder: Path, c: dict) -> None:
    """Qwen2 BPE files (``vocab.json``, ``merges.txt``) + Dream's remote-code tokenizer class name."""
    letters = [chr(ord("a") + i) for i in range(26)] + ["Ġ"]
    specials = {c["eos_token_id"]: "<|endoftext|>", c["mask_token_id"]: "<|mask|>"}
    names = letters + [specials.get(i, f"<|reserved_{i}|>") for i in range(len(letters), c["vocab_size"])]
    vocab = {name: i for i, name in enumerate(names)}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    cfg = {
        "tokenizer_class": "DreamTokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_dream.DreamTokenizer", None]},
        "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "mask_token": "<|mask|>",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))


def write_folder(folder: Path, family: str, *, seed: int = 0, sharded: bool | None = None, **overrides) -> Path:
    """Write a random-weight checkpoint folder of ``family`` (``"llada"`` or ``"dream"``)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {**(LLADA_CONFIG if family == "llada" else DREAM_CONFIG), **overrides}
    keys = llada_keys(config) if family == "llada" else dream_keys(config)
    weights = random_weights(keys, seed, HEAD_SCALE[family])
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    if sharded if sharded is not None else family == "llada":  # LLaDA ships shards with an index
        names = sorted(weights)
        half = len(names) // 2
        shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
        weight_map = {}
        for shard, part in shards.items():
            save_file({k: weights[k] for k in part}, str(folder / shard))
            weight_map.update(dict.fromkeys(part, shard))
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    else:
        save_file(weights, str(folder / "model.safetensors"))
    (write_llada_tokenizer if family == "llada" else write_dream_tokenizer)(folder, config)
    return folder
