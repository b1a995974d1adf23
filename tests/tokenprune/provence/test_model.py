"""Provence model, checkpoint layouts, tokenizers, and ProvencePruner.process end to end."""

import json
import sys

import numpy as np
import pytest
import torch
from torch import nn

from tests.helpers.provence import tiny_bert as _tiny_bert
from tests.helpers.provence import tok_wordpiece as _tok_wordpiece
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
    assert out.kept_sentences == [0, 1, 4]
    assert out.pruned_context == ("Zebra facts\nThe zebra runs in the savanna.\nZebra stripes confuse flies.")
    assert out.compression == pytest.approx(1 - len(out.pruned_context) / len(ctx))
    stats = out.stats  # counted in the model's tokens: context tokens in, tokens of kept sentences
    off = np.array(tokenizer(ctx, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"])
    spans = token_sentence_spans(off, split_sentences(ctx))
    assert (stats.method, stats.tokens_in, stats.forward_passes) == ("provence", len(off), 1)
    assert stats.tokens_kept == sum(b - a for a, b in spans[[0, 1, 4]]) < stats.tokens_in
    assert stats.extras == {"contexts": 1, "blocks": 1}
    # title rule: with always_select_title the title follows the others
    only_title = "Zebra facts\nLions hunt at night. Cats sleep a lot."
    assert pruner.process("q", only_title, always_select_title=True).pruned_context == ""
    assert pruner.process("q", only_title).pruned_context == "Zebra facts"


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
    assert small.kept_sentences == big.kept_sentences == [7, 31, 40]
    assert small.pruned_context == big.pruned_context
    assert small.pruned_context.endswith(long_sentence)
    # the reranking score is the max over blocks: smaller windows see fewer keyword tokens
    assert small.reranking_score < big.reranking_score
    assert small.reranking_score >= 2


# ------------------------------------------------------------------ tiny random model
def test_tiny_random_model_end_to_end_shapes_and_batching(minilm_tok):
    model = _tiny_bert(minilm_tok)
    pruner = ProvencePruner(model, minilm_tok, max_length=64, device="cpu")
    ctxs = ["Title A\nFirst sentence here. Second sentence there.", "", "Один. Два предложения здесь.", "x " * 300]
    one = pruner.process("What is first?", ctxs[0], threshold=0.5)
    assert isinstance(one.pruned_context, str) and isinstance(one.reranking_score, float)
    lst = pruner.process("What is first?", ctxs, threshold=0.5)
    assert len(lst.pruned_context) == 4
    nested = pruner.process(
        ["What is first?", ""], [ctxs, ctxs[:2]], threshold=0.5, batch_size=1, enable_warnings=False
    )
    assert [len(r) for r in nested.pruned_context] == [4, 2]
    nested32 = pruner.process(
        ["What is first?", ""], [ctxs, ctxs[:2]], threshold=0.5, batch_size=32, enable_warnings=False
    )
    np.testing.assert_allclose(
        np.concatenate(nested.reranking_score), np.concatenate(nested32.reranking_score), atol=1e-4
    )
    assert nested.kept_sentences == nested32.kept_sentences
    assert lst.pruned_context[1] == "" and lst.compression[1] == 0.0
    for ctx, pruned, kept in zip(ctxs, lst.pruned_context, lst.kept_sentences):
        sents = split_sentences(ctx)
        pieces = [ctx[a:b] for a, b in (sents[i] for i in kept)]
        assert all(p in pruned for p in pieces) and all(p in ctx for p in pieces)
    # thresholds are monotone: a lower threshold keeps a superset
    lo = pruner.process("What is first?", ctxs, threshold=0.0)
    assert all(k == list(range(len(split_sentences(c)))) for k, c in zip(lo.kept_sentences, ctxs))
    hi = pruner.process("What is first?", ctxs, threshold=1.0)
    assert all(k == [] for k in hi.kept_sentences)
    # reorder + top_k
    ro = pruner.process("What is first?", ctxs, reorder=True, top_k=2)
    assert len(ro.pruned_context) == 2
    scores = lst.reranking_score
    assert ro.context_index == list(np.argsort(-np.asarray(scores), kind="stable")[:2])
    assert ro.reranking_score == sorted(ro.reranking_score, reverse=True)
    pairs = pruner.process(["q1", "q2"], ["Ctx one.", "Ctx two."])
    assert isinstance(pairs.pruned_context, list) and len(pairs.pruned_context) == 2
    with pytest.raises(ValueError):
        pruner.process(["q1", "q2"], [["a"]])
    with pytest.raises(TypeError):
        pruner.process("q", 3)


def test_bf16_runs_close_to_fp32(minilm_tok):
    model = _tiny_bert(minilm_tok)
    ctx = "Alpha beta gamma. Delta epsilon. Zeta eta theta iota."
    f32 = ProvencePruner(model, minilm_tok, max_length=64, dtype="float32").process("alpha", ctx)
    b16 = ProvencePruner(_tiny_bert(minilm_tok), minilm_tok, max_length=64, dtype="bfloat16").process("alpha", ctx)
    assert abs(f32.reranking_score - b16.reranking_score) < 0.05
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
    return np.array(out.reranking_score[0])


def test_roundtrip_own_format(tmp_path, minilm_tok):
    model = _tiny_bert(minilm_tok)
    ref = _scores(ProvencePruner(model, minilm_tok, max_length=64))
    save_provence_model(model, minilm_tok, tmp_path / "m", max_length=64)
    keys = set(json.loads((tmp_path / "m" / "prunekit_provence.json").read_text()))
    assert {"format", "max_length"} <= keys
    pruner = ProvencePruner(str(tmp_path / "m"))
    assert pruner.max_length == 64
    np.testing.assert_allclose(_scores(pruner), ref, atol=1e-5)


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


# ------------------------------------------------------------------ concurrency, pickling
THREAD_CASES = [
    ("What is first?", ["Title A\nFirst sentence here. Second sentence there.", "Один. Два предложения здесь."]),
    ("zebra", ["x " * 50, "Short.", ""]),
    ("where do lions hunt at night in the savanna", ["Lions hunt at night. " * 5]),
    ("q", ["Numbers like 3.14 and 2.71 appear. The zebra zebra herd moved north. " * 3, "Cats sleep."]),
]


def _call(pruner, i):
    q, ctxs = THREAD_CASES[i % len(THREAD_CASES)]
    out = pruner.process(q, ctxs, threshold=0.5, batch_size=1 + i % 3)
    return out.pruned_context, out.kept_sentences, out.reranking_score


@pytest.mark.slow
def test_concurrent_calls_give_the_sequential_results(minilm_tok):
    """8 threads x 20 calls on one pruner: every result equals the sequential one (the
    tokenizer's truncation/padding state is per thread; inputs need padding, truncation and
    blocks)."""
    from concurrent.futures import ThreadPoolExecutor

    pruner = ProvencePruner(_tiny_bert(minilm_tok), minilm_tok, max_length=48, device="cpu")
    threads, switch = torch.get_num_threads(), sys.getswitchinterval()
    torch.set_num_threads(1)  # 8 Python threads already; keeps the test fast on a loaded machine
    sys.setswitchinterval(1e-5)  # switch threads often, so a shared-state race shows up
    try:
        expected = [_call(pruner, i) for i in range(160)]
        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(lambda i: _call(pruner, i), range(160)))
    finally:
        torch.set_num_threads(threads)
        sys.setswitchinterval(switch)
    for (p1, k1, s1), (p2, k2, s2) in zip(expected, got):
        assert p1 == p2 and k1 == k2
        np.testing.assert_allclose(s1, s2, atol=1e-5)


def test_pruner_pickles_and_keeps_its_results(minilm_tok):
    import pickle

    pruner = ProvencePruner(_tiny_bert(minilm_tok), minilm_tok, max_length=48, device="cpu")
    pruner.thread_tokenizer()  # a per-thread copy exists and must not break pickling
    clone = pickle.loads(pickle.dumps(pruner))
    for i in range(len(THREAD_CASES)):
        a, b = _call(pruner, i), _call(clone, i)
        assert a[:2] == b[:2]
        np.testing.assert_allclose(a[2], b[2], atol=1e-6)


# ------------------------------------------------------------------ released API compatibility
def test_released_signature_outputs_and_warnings(minilm_tok):
    import warnings

    pruner = ProvencePruner(KeywordProvence(minilm_tok), minilm_tok, max_length=128)
    ctx = "Zebra facts\nLions hunt at night. The zebra runs in the savanna. Cats sleep."
    # the released positional order: title, batch_size, threshold, always_select_title, reorder, top_k, enable_warnings
    out = pruner.process("Where do zebras run?", ctx, "first_sentence", 32, 0.1, True, False, 5, True)
    assert out.pruned_context == "Zebra facts\nThe zebra runs in the savanna."
    assert out.compression_rate == pytest.approx(100 * out.compression)
    assert [ctx[a:b] for a, b in out.kept_spans] == ["Zebra facts", "The zebra runs in the savanna."]
    n_tok = len(minilm_tok(ctx, add_special_tokens=False)["input_ids"])
    assert out.token_compression == pytest.approx(1 - out.stats.tokens_kept / n_tok)
    # a given title is placed before the context: kept_spans still index the context itself
    titled = pruner.process("zebra?", "Lions roar. The zebra runs.", title="Zebra notes", always_select_title=True)
    assert titled.pruned_context == "Zebra notes\nThe zebra runs."
    assert titled.kept_sentences == [0, 2] and titled.kept_spans == [(12, 27)]
    with pytest.warns(UserWarning, match="empty after normalisation"):
        pruner.process("?!", ctx)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pruner.process("?!", ctx, enable_warnings=False)
    with pytest.raises(ValueError, match="batch_size"):
        pruner.process("q", ctx, batch_size=0)
    with pytest.raises(ValueError, match="mode"):
        ProvencePruner(KeywordProvence(minilm_tok), minilm_tok, mode="vote")


def test_token_budget_rule_end_to_end(minilm_tok):
    """keep (a count or a fraction per context) and target_total_tokens keep the best
    sentences that fit, exactly, counted in the model's tokens."""
    from prunecore.budget import keep_count
    from tokenprune.provence.core import budget_sentences, sentence_scores

    pruner = ProvencePruner(KeywordProvence(minilm_tok), minilm_tok, max_length=128)
    ctxs = [
        "Zebra facts\nLions hunt at night. The zebra runs in the savanna. Cats sleep a lot.",
        "A zebra zebra herd is big. Birds sing. The zebra migrates far away every year.",
    ]
    q = "Where do zebras run?"
    scored = pruner.score(q, ctxs)
    for kwargs in (
        {"keep": 9},
        {"target_total_tokens": 14},
        {"keep": 0.5},
        {"keep": 20, "target_total_tokens": 25},
        {"keep": 0.7, "target_total_tokens": 25},
    ):
        out = pruner.decide(scored, **kwargs)
        items = scored["items"][0]
        spans = [token_sentence_spans(it["offsets"], it["sents"]) for it in items]
        caps = []
        for it in items:  # the budgets, written out
            caps.append(keep_count(len(it["offsets"]), kwargs.get("keep", 1.0), clamp=True))
        expected = budget_sentences(
            np.concatenate([sentence_scores(it["probs"], sp) for it, sp in zip(items, spans)]),
            np.concatenate([sp[:, 1] - sp[:, 0] for sp in spans]),
            groups=np.concatenate([np.full(len(sp), c) for c, sp in enumerate(spans)]),
            group_budgets=caps,
            total_budget=kwargs.get("target_total_tokens"),
        )
        n0 = len(spans[0])
        assert out.kept_sentences == [np.flatnonzero(expected[:n0]).tolist(), np.flatnonzero(expected[n0:]).tolist()]
        kept = [sum(b - a for a, b in sp[k]) for sp, k in zip(spans, out.kept_sentences)]
        assert all(k <= cap for k, cap in zip(kept, caps))
        assert out.stats.tokens_kept == sum(kept) <= kwargs.get("target_total_tokens", 10**9)

    # the densest keyword sentence scores highest: a budget of its size keeps exactly it
    def n_tokens(text):
        return len(minilm_tok(text, add_special_tokens=False)["input_ids"])

    best = "A zebra zebra herd is big."
    assert pruner.process(q, ctxs[1], keep=n_tokens(best)).pruned_context == best
    # with always_select_title the title is taken first, inside the budget
    budget = n_tokens("Zebra facts") + n_tokens("The zebra runs in the savanna.")
    titled = pruner.process(q, ctxs[0], keep=budget, always_select_title=True)
    assert titled.pruned_context == "Zebra facts\nThe zebra runs in the savanna."
    assert titled.stats.tokens_kept == budget
    with pytest.raises(ValueError, match="outside"):
        pruner.process(q, ctxs[0], keep=1.5)
    # the deprecated spellings are the same rule, and warn naming keep=
    with pytest.warns(DeprecationWarning, match=r"target_ratio= is deprecated: pass keep=0\.5"):
        by_ratio = pruner.decide(scored, target_ratio=0.5)
    assert pruner.decide(scored, keep=0.5).kept_sentences == by_ratio.kept_sentences
    with pytest.warns(DeprecationWarning, match="target_tokens= is deprecated: pass keep=9"):
        by_tokens = pruner.decide(scored, target_tokens=9)
    assert pruner.decide(scored, keep=9).kept_sentences == by_tokens.kept_sentences
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="not both"):
        pruner.decide(scored, keep=9, target_tokens=5)
    with pytest.raises(TypeError, match="keep"):
        pruner.decide(scored, keep=True)
