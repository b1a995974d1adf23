"""Selection algebra and persistence; SSP and random subsets against brute force."""

import numpy as np
import pandas as pd
import pytest

from dataprune import Selection, class_prototypes, random_subset, semdedup, ssp, ssp_scores
from prunecore import kmeans


def test_and_or_explain_each_drop_by_first_dropper():
    a = Selection.from_mask([True, False, True, False], "duplicate", scores=[0, 1, 2, 3])
    b = Selection.from_mask([False, True, True, False], "quota", scores=[9, np.nan, 8, np.nan])
    both = a & b
    assert both.keep.tolist() == [False, False, True, False]
    assert both.reasons.tolist() == ["quota", "duplicate", "", "duplicate"]
    assert both.scores.tolist() == [9, 1, 8, 3]  # later stage's score where it has one
    either = a | b
    assert either.keep.tolist() == [True, True, True, False]
    assert either.reasons.tolist() == ["", "", "", "duplicate"]
    with pytest.raises(ValueError, match="different row counts"):
        a & Selection.keep_all(3)


def test_lift_composes_a_stage_run_on_survivors():
    first = Selection.from_mask([True, False, True, True, False], "duplicate")
    second = Selection.from_mask([True, False, True], "quota")  # over rows 0, 2, 3
    chained = first & second.lift(first.indices, first.n)
    assert chained.indices.tolist() == [0, 3]
    assert chained.reasons.tolist() == ["", "duplicate", "quota", "", "duplicate"]
    assert chained.reason_counts() == {"duplicate": 2, "quota": 1}


def test_parquet_round_trip_is_atomic_and_exact(tmp_path):
    stats = {"dbp": pd.DataFrame({"cluster": [0, 1], "quota": [3, 4]})}
    sel = Selection.from_mask([True, False, False], "random", scores=[0.1, 0.2, np.nan], stats=stats)
    path = tmp_path / "keep.parquet"
    sel.to_parquet(path)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.parquet"]  # no temp file left
    back = Selection.from_parquet(path)
    np.testing.assert_array_equal(back.keep, sel.keep)
    np.testing.assert_array_equal(back.scores, sel.scores)
    assert back.reasons.tolist() == sel.reasons.tolist()
    pd.testing.assert_frame_equal(back.stats["dbp"], stats["dbp"])


def test_summary_names_reasons():
    text = Selection.from_mask([True, False, False, True], "duplicate").summary()
    assert "kept" in text and "duplicate" in text and "50.0%" in text


def brute_ssp_scores(x, clustering):
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    cents = clustering.centroids / np.linalg.norm(clustering.centroids, axis=1, keepdims=True)
    return np.array([1 - unit[i] @ cents[clustering.labels[i]] for i in range(len(x))])


def test_ssp_scores_and_orders_match_brute_force():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 8)).astype(np.float32)
    clustering = kmeans(x, 5, seed=1)
    scores = ssp_scores(x, clustering)
    np.testing.assert_allclose(scores, brute_ssp_scores(x, clustering), atol=1e-5)
    hard = ssp(x, 0.2, clustering=clustering, order="hard")
    easy = ssp(x, 60, clustering=clustering, order="easy")
    order = sorted(range(300), key=lambda i: (-scores[i], i))
    assert sorted(hard.indices.tolist()) == sorted(order[:60])
    order = sorted(range(300), key=lambda i: (scores[i], i))
    assert sorted(easy.indices.tolist()) == sorted(order[:60])
    assert set(hard.reason_counts()) == {"prototypical"}
    assert set(easy.reason_counts()) == {"atypical"}


def test_supervised_prototypes_are_class_means():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((90, 6)).astype(np.float32)
    labels = np.repeat(np.arange(3), 30)
    proto = class_prototypes(x, labels)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    for c in range(3):
        mean = unit[labels == c].mean(0)
        np.testing.assert_allclose(proto.centroids[c], mean / np.linalg.norm(mean), atol=1e-5)
    sel = ssp(x, 0.5, labels=labels)
    want = ssp(x, 0.5, clustering=proto)
    np.testing.assert_array_equal(sel.keep, want.keep)
    with pytest.raises(ValueError, match=r"empty class\(es\) \[1\]"):
        class_prototypes(x, np.where(labels == 1, 2, labels))


def test_ssp_determinism_and_errors():
    x = np.random.default_rng(2).standard_normal((100, 4)).astype(np.float32)
    a, b = ssp(x, 0.3, k=3, seed=5), ssp(x, 0.3, k=3, seed=5)
    np.testing.assert_array_equal(a.keep, b.keep)
    assert ssp(x, 0.3, k=3, seed=6).n_kept == 30
    with pytest.raises(ValueError, match="order must be one of"):
        ssp(x, 0.3, k=3, order="medium")
    with pytest.raises(ValueError, match="either a clustering or k"):
        ssp(x, 0.3)


def test_random_subset_is_seeded_and_exact():
    a, b, c = (random_subset(1000, 0.3, seed=s) for s in (1, 1, 2))
    np.testing.assert_array_equal(a.keep, b.keep)
    assert a.n_kept == c.n_kept == 300 and not np.array_equal(a.keep, c.keep)
    assert set(a.reason_counts()) == {"random"}
    assert random_subset(5, 5, seed=0).keep.all()


def test_semdedup_then_ssp_explains_every_drop():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((200, 16)).astype(np.float32)
    x = np.concatenate([x, x[:20]])
    dedup = semdedup(x, 0.01, k=4)
    survivors = x[dedup.indices]
    rest = ssp(survivors, 0.5, k=4)
    chained = dedup & rest.lift(dedup.indices, dedup.n)
    assert chained.reason_counts() == {"duplicate": 20, "prototypical": 100}
    assert chained.n_kept == 100
