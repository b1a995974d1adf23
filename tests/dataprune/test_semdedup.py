"""SemDeDup against brute-force loops, planted duplicates, chains, ties, edge cases."""

import numpy as np
import pytest

from dataprune import semdedup, semdedup_sweep
from prunecore import Clustering, kmeans, l2_normalize


def brute_semdedup(x, labels, sim, eps, rule, order="hard"):
    """Row-by-row reference: walk each cluster in order, compare with earlier rows."""
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    keep = np.ones(len(x), dtype=bool)
    for c in np.unique(labels):
        rows = [i for i in range(len(x)) if labels[i] == c]
        key = {"hard": lambda i: (sim[i], i), "easy": lambda i: (-sim[i], i)}[order]
        rows.sort(key=key)
        kept = []
        for pos, j in enumerate(rows):
            earlier = rows[:pos] if rule == "reference" else kept
            if any(float(unit[i] @ unit[j]) > 1 - eps for i in earlier):
                keep[j] = False
            else:
                kept.append(j)
    return keep


def fixed_clustering(x, labels):
    """A clustering with given labels and centroids = unit class means (no k-means noise)."""
    unit = l2_normalize(x)
    k = labels.max() + 1
    cents = l2_normalize(np.stack([unit[labels == c].mean(0) for c in range(k)]))
    return Clustering(
        centroids=cents,
        labels=labels.astype(np.int64),
        sim=np.einsum("nd,nd->n", unit, cents[labels]).astype(np.float32),
    )


@pytest.mark.parametrize("rule", ["reference", "greedy"])
@pytest.mark.parametrize("order", ["hard", "easy"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_brute_force_on_random_near_duplicates(rule, order, seed):
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((60, 8)).astype(np.float32)
    # many near copies so that chains and overlapping groups occur
    x = np.concatenate([base, base[rng.integers(0, 60, 90)] + 0.15 * rng.standard_normal((90, 8)).astype(np.float32)])
    labels = rng.integers(0, 4, len(x))
    clustering = fixed_clustering(x, labels)
    for eps in (0.01, 0.05, 0.2):
        expected = brute_semdedup(x, labels, clustering.sim, eps, rule, order)
        for block in (2, 7, 1000):
            got = semdedup(x, eps, clustering=clustering, rule=rule, order=order, block_size=block, device="cpu")
            np.testing.assert_array_equal(got.keep, expected, err_msg=f"eps={eps} block={block}")


def test_finds_exactly_the_planted_duplicates():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((400, 32)).astype(np.float32)  # random: pairwise cos ~ 0 +- 0.2
    copies = rng.choice(400, 40, replace=False)
    near = x[copies] * 3.0 + 1e-3 * rng.standard_normal((40, 32)).astype(np.float32)
    x = np.concatenate([x, near])
    sel = semdedup(x, 0.01, k=5, device="cpu")
    assert sel.n_kept == 400
    dropped = np.flatnonzero(~sel.keep)
    pairs = {frozenset((int(a), 400 + i)) for i, a in enumerate(copies)}
    # exactly one member of every planted pair is dropped, nothing else
    assert len(dropped) == 40
    assert all(len(pair & set(dropped.tolist())) == 1 for pair in pairs)
    assert set(sel.reason_counts()) == {"duplicate"}


def chain_points():
    """A~B and B~C above threshold, A and C not: cos(A,B)=cos(B,C)=cos(20deg), cos(A,C)=cos(40deg)."""
    angles = np.deg2rad([0.0, 20.0, 40.0])
    pts = np.stack([np.cos(angles), np.sin(angles), np.zeros(3)], 1).astype(np.float32)
    return pts


def test_chain_rules_differ_as_specified():
    x = chain_points()
    labels = np.zeros(3, dtype=np.int64)
    # walk order A, B, C: give decreasing similarity to the centroid (hard = ascending sim)
    clustering = Clustering(
        centroids=np.array([[0, 0, 1]], np.float32), labels=labels, sim=np.array([0.1, 0.2, 0.3], np.float32)
    )
    eps = 1 - np.cos(np.deg2rad(30.0))  # 20deg pairs are duplicates, 40deg is not
    ref = semdedup(x, eps, clustering=clustering, rule="reference", device="cpu")
    greedy = semdedup(x, eps, clustering=clustering, rule="greedy", device="cpu")
    assert ref.keep.tolist() == [True, False, False]
    assert greedy.keep.tolist() == [True, False, True]


def test_several_eps_in_one_pass_equal_separate_runs_and_are_nested():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((300, 16)).astype(np.float32)
    x = np.concatenate([x, x[:100] + 0.3 * rng.standard_normal((100, 16)).astype(np.float32)])
    clustering = kmeans(x, 6, seed=0)
    eps_list = [0.02, 0.1, 0.3]
    for rule in ("reference", "greedy"):
        many = semdedup_sweep(x, eps_list, clustering=clustering, rule=rule, block_size=64)
        for e in eps_list:
            single = semdedup(x, e, clustering=clustering, rule=rule)
            np.testing.assert_array_equal(many[e].keep, single.keep)
    ref = semdedup_sweep(x, eps_list, clustering=clustering)
    assert ref[0.02].n_kept >= ref[0.1].n_kept >= ref[0.3].n_kept
    assert (ref[0.3].keep <= ref[0.1].keep).all()  # reference rule: larger eps drops a superset


def test_exact_ties_and_identical_rows():
    x = np.tile(np.array([[1.0, 2.0, 3.0]], np.float32), (5, 1))
    x = np.concatenate([x, np.array([[3.0, -1.0, 0.0]], np.float32)])
    sel = semdedup(x, 1e-6, clustering=fixed_clustering(x, np.zeros(6, np.int64)))
    assert sel.n_kept == 2
    assert sel.keep[:5].sum() == 1 and sel.keep[5]
    # ties in the walk order resolve to the lowest row index first
    assert sel.keep[0]


def test_singletons_and_k_equals_n_keep_everything():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((12, 4)).astype(np.float32)
    clustering = fixed_clustering(x, np.arange(12))
    sel = semdedup(x, 0.5, clustering=clustering)
    assert sel.keep.all()
    assert np.isnan(sel.scores).all()  # no earlier row in any cluster


def test_k_equals_one_and_random_order_is_seeded():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((80, 64)).astype(np.float32)
    x = np.concatenate([x, x + 0.05 * rng.standard_normal(x.shape).astype(np.float32)])
    a = semdedup(x, 0.05, k=1, order="random", seed=7)
    b = semdedup(x, 0.05, k=1, order="random", seed=7)
    c = semdedup(x, 0.05, k=1, order="random", seed=8)
    np.testing.assert_array_equal(a.keep, b.keep)
    assert a.n_kept == c.n_kept == 80  # one of each near pair survives in any order
    assert not np.array_equal(a.keep, c.keep)  # which one survives depends on the order


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.zeros((0, 4), np.float32), "empty"),
        (np.ones((3,), np.float32), "2-D"),
        (np.ones((3, 4), np.int32), "floating"),
    ],
)
def test_bad_input_errors(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        semdedup(bad, 0.1, k=1)


def test_nan_rows_are_named():
    x = np.ones((10, 3), np.float32)
    x[[2, 7], 1] = np.nan
    with pytest.raises(ValueError, match=r"NaN/inf in rows \[2, 7\]"):
        semdedup(x, 0.1, k=2)


def test_parameter_errors():
    x = np.random.default_rng(0).standard_normal((10, 3)).astype(np.float32)
    with pytest.raises(ValueError, match="k=11"):
        semdedup(x, 0.1, k=11)
    with pytest.raises(ValueError, match="either a clustering or k"):
        semdedup(x, 0.1)
    with pytest.raises(ValueError, match="rule"):
        semdedup(x, 0.1, k=2, rule="fuzzy")
    with pytest.raises(ValueError, match="order"):
        semdedup(x, 0.1, k=2, order="up")
    with pytest.raises(ValueError, match="eps"):
        semdedup(x, -0.1, k=2)


@pytest.mark.parametrize("rule", ["reference", "greedy"])
def test_mixed_cluster_sizes_with_automatic_blocks(rule):
    """Sizes 1, 2, 3, ... and one cluster spanning several automatic blocks (> 64 rows)."""
    rng = np.random.default_rng(11)
    sizes = [1, 2, 3, 5, 8, 13, 40, 600]
    labels = np.repeat(np.arange(len(sizes)), sizes)
    base = rng.standard_normal((len(labels), 6)).astype(np.float32)
    x = base.copy()
    x[1::3] = base[0::3][: len(x[1::3])] + 0.2 * rng.standard_normal((len(x[1::3]), 6))
    clustering = fixed_clustering(x, labels)
    eps_list = [0.05, 0.3]
    got = semdedup_sweep(x, eps_list, clustering=clustering, rule=rule, device="cpu")
    for e in eps_list:
        np.testing.assert_array_equal(got[e].keep, brute_semdedup(x, labels, clustering.sim, e, rule))
        assert got[e].n_kept < len(x)  # the planted near-copies exist in several clusters
