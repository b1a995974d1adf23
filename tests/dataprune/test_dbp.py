"""DBP: complexity against a brute-force loop, quotas against a QP solver, properties."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import minimize

from dataprune import cluster_complexity, dbp, dbp_quotas
from dataprune.dbp import quota_bounds, softmax, waterfill
from prunecore import kmeans


def brute_complexity(x, clustering, n_neighbors):
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    cents = clustering.centroids / np.linalg.norm(clustering.centroids, axis=1, keepdims=True)
    k = len(cents)
    d_intra, d_inter = np.zeros(k), np.zeros(k)
    for j in range(k):
        members = unit[clustering.labels == j]
        d_intra[j] = np.mean([1 - m @ cents[j] for m in members])
        others = sorted(1 - cents[j] @ cents[l] for l in range(k) if l != j)
        d_inter[j] = np.mean(others[:n_neighbors])
    return d_intra, d_inter, d_intra * d_inter


def test_complexity_matches_brute_force():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((500, 12)).astype(np.float32)
    clustering = kmeans(x, 9, seed=0)
    for nb in (1, 3, 20):
        got = cluster_complexity(x, clustering, n_neighbors=nb)
        want = brute_complexity(x, clustering, min(nb, 8))
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def qp_reference(target, total, lb, ub):
    """Brute-force QP: scipy SLSQP on min ||x - target||^2, sum x = total, lb <= x <= ub."""
    res = minimize(
        lambda x: ((x - target) ** 2).sum(),
        x0=np.clip(target, lb, ub),
        jac=lambda x: 2 * (x - target),
        method="SLSQP",
        bounds=list(zip(lb, ub)),
        constraints=[{"type": "eq", "fun": lambda x: x.sum() - total, "jac": lambda x: np.ones_like(x)}],
        options={"ftol": 1e-12, "maxiter": 500},
    )
    return res.x


quota_cases = st.integers(1, 12).flatmap(
    lambda k: st.tuples(
        st.lists(st.integers(0, 40), min_size=k, max_size=k),
        st.lists(st.floats(0.0, 1.0), min_size=k, max_size=k),
        st.floats(0.0, 1.0),
        st.sampled_from([0.05, 0.1, 0.5, 2.0]),
        st.sampled_from([0.0, 0.5]),
        st.integers(0, 1),
    )
)


@settings(max_examples=150, deadline=None)
@given(quota_cases)
def test_quota_properties(case):
    sizes, comp, frac, temp, balance, min_per = case
    sizes, comp = np.array(sizes), np.array(comp)
    n_keep = int(round(frac * sizes.sum()))
    lb, ub = quota_bounds(sizes, n_keep, balance=balance, min_per_cluster=min_per)
    if lb.sum() > n_keep:
        with pytest.raises(ValueError, match="floors"):
            dbp_quotas(sizes, comp, n_keep, temperature=temp, balance=balance, min_per_cluster=min_per)
        return
    q = dbp_quotas(sizes, comp, n_keep, temperature=temp, balance=balance, min_per_cluster=min_per)
    assert q.sum() == n_keep
    assert (q >= lb).all() and (q <= ub).all()
    # the continuous solution is the QP optimum, and rounding moves each entry by < 1
    x = waterfill(softmax(comp, temp) * n_keep, n_keep, lb, ub)
    ref = qp_reference(softmax(comp, temp) * n_keep, n_keep, lb.astype(float), ub.astype(float))
    ours = ((x - softmax(comp, temp) * n_keep) ** 2).sum()
    theirs = ((ref - softmax(comp, temp) * n_keep) ** 2).sum()
    assert ours <= theirs + 1e-6 * max(1.0, theirs)  # SLSQP's equality holds to ~1e-8
    np.testing.assert_allclose(x, ref, atol=1e-3)
    assert np.abs(q - x).max() < 1.0 + 1e-9


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(0.0, 1.0), min_size=2, max_size=15), st.floats(0.05, 0.95), st.sampled_from([0.05, 0.2, 1.0]))
def test_quotas_monotone_in_complexity_for_equal_sizes(comp, frac, temp):
    comp = np.array(comp)
    sizes = np.full(comp.shape, 50)
    q = dbp_quotas(sizes, comp, int(frac * sizes.sum()), temperature=temp)
    # strictly more complex -> at least as many rows
    for i in range(len(comp)):
        for j in range(len(comp)):
            if comp[i] > comp[j]:
                assert q[i] >= q[j]


def test_capped_clusters_spread_surplus_and_sum_exactly():
    sizes = np.array([5, 1000, 1000, 1000])
    comp = np.array([10.0, 0.1, 0.1, 0.1])  # cluster 0 wants nearly all, holds only 5
    q = dbp_quotas(sizes, comp, 301, temperature=0.1, min_per_cluster=0)
    assert q[0] == 5 and q.sum() == 301
    assert q[1:].max() - q[1:].min() <= 1


def test_quota_input_errors():
    with pytest.raises(ValueError, match="n_keep"):
        dbp_quotas(np.array([3, 3]), np.array([1.0, 1.0]), 7, temperature=0.5)
    with pytest.raises(ValueError, match="NaN"):
        dbp_quotas(np.array([3, 3]), np.array([np.nan, 1.0]), 2, temperature=0.5)
    with pytest.raises(ValueError, match="temperature"):
        dbp_quotas(np.array([3, 3]), np.array([1.0, 1.0]), 2, temperature=0.0)
    with pytest.raises(ValueError, match="floors"):
        dbp_quotas(np.array([3, 3, 3]), np.array([1.0, 1.0, 1.0]), 2, temperature=0.5)


def test_dbp_keeps_quota_rows_farthest_from_centroid():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((600, 10)).astype(np.float32)
    clustering = kmeans(x, 6, seed=0)
    sel = dbp(x, 0.25, clustering=clustering, temperature=0.1)
    stats = sel.stats["dbp"]
    assert sel.n_kept == 150 == stats["quota"].sum()
    kept_per = np.bincount(clustering.labels[sel.keep], minlength=6)
    np.testing.assert_array_equal(kept_per, stats["quota"].to_numpy())
    for c in range(6):
        members = clustering.labels == c
        kept_sim = clustering.sim[members & sel.keep]
        dropped_sim = clustering.sim[members & ~sel.keep]
        if kept_sim.size and dropped_sim.size:
            assert kept_sim.max() <= dropped_sim.min()  # hard = farthest kept
    easy = dbp(x, 0.25, clustering=clustering, temperature=0.1, order="easy")
    for c in range(6):
        members = clustering.labels == c
        if (members & easy.keep).any() and (members & ~easy.keep).any():
            assert clustering.sim[members & easy.keep].min() >= clustering.sim[members & ~easy.keep].max()
    assert set(sel.reason_counts()) == {"quota"}


def test_dbp_k1_and_determinism():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((100, 5)).astype(np.float32)
    one = dbp(x, 30, k=1, temperature=0.5)
    assert one.n_kept == 30
    a = dbp(x, 0.5, k=4, temperature=0.5, seed=3)
    b = dbp(x, 0.5, k=4, temperature=0.5, seed=3)
    np.testing.assert_array_equal(a.keep, b.keep)
    c = dbp(x, 0.5, k=4, temperature=0.5, seed=4)
    assert c.n_kept == 50
