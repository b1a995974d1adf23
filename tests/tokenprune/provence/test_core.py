"""Pure parts of Provence: splitting, query normalisation, token->sentence spans, sentence
rules (against brute-force loops), title rule, blocking/stitching, assembly."""

import numpy as np
import pytest

from tokenprune.provence.core import (
    MODES,
    apply_title_rule,
    assemble_pruned,
    budget_sentences,
    compression,
    normalize_query,
    plan_blocks,
    provence_sentences,
    sentence_scores,
    stitch_blocks,
    token_sentence_spans,
)
from tokenprune.provence.sentences import sentence_texts, split_sentences


# ---------------------------------------------------------------- sentence splitting
@pytest.mark.parametrize(
    "text,expected",
    [
        ("Dr. Smith went home. He slept.", ["Dr. Smith went home.", "He slept."]),
        ("The rate was 3.14 percent. It rose.", ["The rate was 3.14 percent.", "It rose."]),
        ("Shown before [12]. Next one.", ["Shown before [12].", "Next one."]),
        ("Viral load rose.[3] Patients recovered.", ["Viral load rose.[3]", "Patients recovered."]),
        ("Seen in 2 cases [4, 7-9]. Rare.", ["Seen in 2 cases [4, 7-9].", "Rare."]),
        (
            "Smith et al. (2020) found it. See Fig. 2 for more.",
            ["Smith et al. (2020) found it.", "See Fig. 2 for more."],
        ),
        ("e.g. Apples. J. R. Tolkien wrote it.", ["e.g. Apples.", "J. R. Tolkien wrote it."]),
        ("Arrived at 3 p.m. on Monday. Left.", ["Arrived at 3 p.m. on Monday.", "Left."]),
        ("Title line\nBody sentence one. Body two!", ["Title line", "Body sentence one.", "Body two!"]),
        ('Really?! "Yes." Then (maybe) more... Done', ["Really?!", '"Yes."', "Then (maybe) more...", "Done"]),
        ("lower case. after a period stays", ["lower case. after a period stays"]),
        ("这是中文。这是第二句！好吗？", ["这是中文。", "这是第二句！", "好吗？"]),
        ("Он пришёл. Она ушла.", ["Он пришёл.", "Она ушла."]),
        ("", []),
        ("   \n\n  ", []),
        ("no punctuation", ["no punctuation"]),
    ],
)
def test_split_sentences_cases(text, expected):
    assert sentence_texts(text) == expected
    for a, b in split_sentences(text):  # exact substrings, no surrounding whitespace
        assert text[a:b] == text[a:b].strip() and b > a


def test_split_sentences_newline_option_and_type():
    assert sentence_texts("one\ntwo", split_newlines=False) == ["one\ntwo"]
    with pytest.raises(TypeError):
        split_sentences(None)


def test_split_sentences_spans_are_ordered_on_random_text():
    rng = np.random.default_rng(0)
    pieces = ["Word", "word", ".", " ", "\n", "Dr.", "3.5", "[1]", "?", "É", "x"]
    for _ in range(200):
        text = "".join(rng.choice(pieces, size=rng.integers(0, 30)))
        spans = split_sentences(text)
        ends = [0] + [e for _, e in spans]
        assert all(a >= pe for (a, _), pe in zip(spans, ends))
        # nothing but whitespace is lost
        covered = "".join(text[a:b] for a, b in spans)
        assert covered.replace(" ", "") == "".join(text.split())


# ---------------------------------------------------------------- query normalisation
def test_normalize_query():
    assert normalize_query("  What IS   the R0, of SARS-CoV-2?! ") == "what is the r0 of sarscov2"
    assert normalize_query("") == ""
    assert normalize_query("Qu'est-ce que\tla «grippe» ?") == "questce que la «grippe»"
    with pytest.raises(TypeError):
        normalize_query(3)


# ---------------------------------------------------------------- token -> sentence spans
def test_token_sentence_spans_handmade():
    text = "Ab cd. Ef gh."
    sents = split_sentences(text)  # [(0,6), (7,13)]
    # tokens: "Ab", " cd", ".", " Ef" (leading space belongs to the word), "gh", "."
    offs = [(0, 2), (2, 5), (5, 6), (6, 9), (10, 12), (12, 13)]
    spans = token_sentence_spans(offs, sents)
    assert spans.tolist() == [[0, 3], [3, 6]]
    # a whitespace-only token between sentences belongs to none
    offs2 = [(0, 2), (3, 5), (5, 6), (6, 7), (7, 9), (10, 12), (12, 13)]
    assert token_sentence_spans(offs2, sents).tolist() == [[0, 3], [4, 7]]
    assert token_sentence_spans(np.zeros((0, 2)), sents).tolist() == [[0, 0], [0, 0]]
    with pytest.raises(ValueError):
        token_sentence_spans([(5, 6), (0, 1)], sents)


# ---------------------------------------------------------------- sentence rules
def _brute(probs, spans, t, mode):
    out = []
    for a, b in spans:
        p = probs[a:b]
        if len(p) == 0:
            out.append(False)
            continue
        kept = [x > t for x in p]
        if mode == "decision_average":
            out.append(sum(kept) / len(p) > t)
        elif mode == "probability_average":
            out.append(sum(p) / len(p) > t)
        else:
            out.append(sum(kept) > len(p) / 2)
    return np.array(out, dtype=bool)


@pytest.mark.parametrize("mode", MODES)
def test_provence_sentences_matches_brute_force(mode):
    rng = np.random.default_rng(1)
    for _trial in range(300):
        T = int(rng.integers(0, 40))
        probs = rng.random(T) ** rng.uniform(0.2, 4)
        cuts = np.sort(rng.integers(0, T + 1, size=int(rng.integers(0, 8))))
        bounds = np.concatenate([[0], cuts, [T]])
        spans = np.stack([bounds[:-1], bounds[1:]], 1)
        t = float(rng.choice([0.1, 0.3, 0.5, 0.9, rng.random()]))
        got = provence_sentences(probs, spans, threshold=t, mode=mode)
        np.testing.assert_array_equal(got, _brute(probs, spans, t, mode))


def test_provence_sentences_modes_differ_and_validate():
    probs = np.array([0.95, 0.05, 0.05, 0.05, 0.05])
    spans = np.array([[0, 5]])
    # decision_average: 1/5 = 0.2 > 0.1 -> kept; majority: 1 of 5 -> not; prob avg 0.23 > .1
    assert provence_sentences(probs, spans)[0]
    assert not provence_sentences(probs, spans, mode="majority")[0]
    assert not provence_sentences(probs, spans, threshold=0.25, mode="probability_average")[0]
    import torch

    assert provence_sentences(torch.tensor(probs), spans)[0]
    with pytest.raises(ValueError, match="mode"):
        provence_sentences(probs, spans, mode="vote")
    with pytest.raises(ValueError, match="NaN"):
        provence_sentences(np.array([np.nan]), [[0, 1]])
    with pytest.raises(ValueError, match="spans"):
        provence_sentences(probs, [[0, 9]])
    with pytest.raises(ValueError, match="1-D"):
        provence_sentences(probs[None], spans)
    assert provence_sentences(probs, np.zeros((0, 2))).shape == (0,)


# ---------------------------------------------------------------- title rule
def test_title_rule_edge_cases():
    def f(k, **kw):
        return apply_title_rule(np.array(k, bool), **kw).tolist()

    # nothing kept -> empty
    assert f([0, 0, 0], always_select_title=True) == [False] * 3
    # only the title passes -> still empty with the rule
    assert f([1, 0, 0], always_select_title=True) == [False] * 3
    assert f([1, 0, 0], always_select_title=False) == [True, False, False]
    # another sentence kept -> title added
    assert f([0, 0, 1], always_select_title=True) == [True, False, True]
    assert f([0, 0, 1], always_select_title=False) == [False, False, True]
    assert f([0, 1], title_index=None, always_select_title=True) == [False, True]
    assert f([], always_select_title=True) == []
    assert f([1], always_select_title=True) == [False]
    with pytest.raises(ValueError):
        f([1, 0], title_index=5, always_select_title=True)


# ---------------------------------------------------------------- blocks
def test_plan_blocks_packs_sentences_and_cuts_long_ones():
    starts = [0, 3, 5, 20, 22]  # sentence lengths 3, 2, 15, 2, 3 (T=25)
    blocks = plan_blocks(starts, 25, budget=6)
    assert blocks == [(0, 5), (5, 11), (11, 17), (17, 22), (22, 25)]  # leftover packs on
    assert plan_blocks(starts, 25, budget=100) == [(0, 25)]
    assert plan_blocks([], 0, budget=4) == [(0, 0)]
    rng = np.random.default_rng(2)
    for _ in range(200):
        T = int(rng.integers(1, 60))
        st = np.unique(rng.integers(0, T, size=int(rng.integers(1, 10))))
        budget = int(rng.integers(1, 20))
        bl = plan_blocks(st, T, budget)
        assert bl[0][0] == 0 and bl[-1][1] == T
        assert all(b - a <= budget and b > a for a, b in bl)
        assert all(bl[i][1] == bl[i + 1][0] for i in range(len(bl) - 1))
        # a block boundary falls inside a sentence only when that sentence is too long
        bounds = set(np.concatenate([[0], st, [T]]).tolist())
        sb = sorted(bounds)
        for a, _ in bl[1:]:
            if a not in bounds:
                i = np.searchsorted(sb, a) - 1
                assert sb[i + 1] - sb[i] > budget
    with pytest.raises(ValueError):
        plan_blocks([0], 5, budget=0)


def test_stitch_blocks_orders_and_takes_max_score():
    offs, probs, score = stitch_blocks([[(10, 12), (13, 15)], [(0, 3), (4, 9)]], [[0.1, 0.2], [0.3, 0.4]], [0.5, 2.5])
    assert offs[:, 0].tolist() == [0, 4, 10, 13]
    np.testing.assert_allclose(probs, [0.3, 0.4, 0.1, 0.2])
    assert score == 2.5
    with pytest.raises(ValueError):
        stitch_blocks([], [], [])


# ---------------------------------------------------------------- assembly
def test_assemble_pruned_exact_substrings():
    text = "Title\nFirst one. Second one.  Third one.\nFourth."
    sents = split_sentences(text)
    assert assemble_pruned(text, sents, [1, 1, 1, 1, 1]) == text
    assert assemble_pruned(text, sents, [0, 1, 1, 0, 0]) == "First one. Second one."
    out = assemble_pruned(text, sents, [1, 0, 1, 0, 1])
    assert out == "Title\nSecond one.\nFourth."  # line breaks are preserved
    assert assemble_pruned(text, sents, [0, 1, 0, 1, 0]) == "First one. Third one."
    assert assemble_pruned(text, sents, [0] * 5) == ""
    assert compression(text, out) == pytest.approx(1 - len(out) / len(text))
    assert compression("", "") == 0.0
    with pytest.raises(ValueError):
        assemble_pruned(text, sents, [1, 0])


# ---------------------------------------------------------------- token budget rule
def _lex_max_brute(scores, lengths, groups, group_budgets, total):
    """Among all feasible subsets, the one whose membership read in score order (ties: lower
    index first) is lexicographically largest; -inf / 0-token sentences never chosen."""
    import itertools

    n = len(scores)
    order = sorted(range(n), key=lambda i: (-scores[i], i))
    best, best_key = np.zeros(n, bool), None
    for bits in itertools.product([0, 1], repeat=n):
        keep = np.array(bits, bool)
        if any(keep[i] and (scores[i] == -np.inf or lengths[i] == 0) for i in range(n)):
            continue
        if total is not None and lengths[keep].sum() > total:
            continue
        if any(lengths[keep & (groups == g)].sum() > b for g, b in enumerate(group_budgets)):
            continue
        key = tuple(int(keep[i]) for i in order)
        if best_key is None or key > best_key:
            best, best_key = keep, key
    return best


def test_budget_sentences_matches_brute_force():
    rng = np.random.default_rng(3)
    for _ in range(300):
        n = int(rng.integers(0, 9))
        scores = rng.choice([0.1, 0.5, 0.9, -np.inf, np.inf], size=n) if rng.random() < 0.3 else rng.random(n)
        lengths = rng.integers(0, 12, size=n)
        n_groups = int(rng.integers(1, 4))
        groups = rng.integers(0, n_groups, size=n)
        group_budgets = rng.integers(0, 25, size=n_groups)
        total = None if rng.random() < 0.3 else int(rng.integers(0, 40))
        got = budget_sentences(scores, lengths, groups=groups, group_budgets=group_budgets, total_budget=total)
        np.testing.assert_array_equal(got, _lex_max_brute(scores, lengths, groups, group_budgets, total))


def test_budget_sentences_properties():
    scores = np.array([0.9, 0.2, 0.8, 0.7, 0.1])
    lengths = np.array([5, 1, 6, 2, 3])
    # best-first: 0 (5), 2 (6 > 10-5 left? 5+6=11 > 10 -> skipped), 3 (2), 1 (1) -> total 8, 4 (3) skipped
    assert budget_sentences(scores, lengths, total_budget=10).tolist() == [True, True, False, True, False]
    assert budget_sentences(scores, lengths).all()  # no budget: everything with tokens
    assert not budget_sentences(scores, lengths, total_budget=0).any()
    # per-document budgets and a total together
    groups = np.array([0, 0, 1, 1, 1])
    keep = budget_sentences(scores, lengths, groups=groups, group_budgets=[5, 8], total_budget=12)
    assert keep.tolist() == [True, False, True, False, False]  # 3 fits its document, not the total
    with pytest.raises(ValueError, match="NaN"):
        budget_sentences([np.nan], [1])
    with pytest.raises(ValueError, match="lengths"):
        budget_sentences([0.1, 0.2], [1])
    with pytest.raises(ValueError, match="group_budgets"):
        budget_sentences([0.1, 0.2], [1, 1], groups=[0, 1], group_budgets=[3])


def test_sentence_scores_is_the_mean_probability():
    probs = np.array([0.2, 0.4, 0.9, 0.1])
    got = sentence_scores(probs, [[0, 2], [2, 4], [4, 4]])
    np.testing.assert_allclose(got[:2], [0.3, 0.5])
    assert got[2] == -np.inf
