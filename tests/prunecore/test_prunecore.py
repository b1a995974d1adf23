"""prunecore: normalisation errors, k-means/assign exactness, row sources, keep_count."""

import numpy as np
import pytest

from prunecore import ChunkedRows, RowSubset, assign, keep_count, kmeans, l2_normalize, open_embeddings, top_k_mask


def test_l2_normalize_unit_rows_and_input_untouched():
    x = np.array([[3.0, 4.0], [0.0, 2.0]], dtype=np.float16)
    before = x.copy()
    out = l2_normalize(x)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [[0.6, 0.8], [0.0, 1.0]], rtol=1e-3)
    np.testing.assert_array_equal(x, before)


def test_l2_normalize_names_bad_rows():
    x = np.ones((6, 3), np.float32)
    x[4] = 0
    with pytest.raises(ValueError, match=r"zero norm in rows \[4\]"):
        l2_normalize(x)
    x[4] = 1
    x[1, 0] = np.inf
    with pytest.raises(ValueError, match=r"NaN/inf in rows \[11\]"):
        l2_normalize(x, row_ids=10)


def brute_assign(x, centroids):
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    cents = centroids / np.linalg.norm(centroids, axis=1, keepdims=True)
    sims = unit @ cents.T
    return sims.argmax(1), sims.max(1)


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_assign_streams_and_matches_brute_force(backend):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1000, 16)).astype(np.float32) * 5
    cents = rng.standard_normal((7, 16)).astype(np.float32)
    labels, sim = assign(x, cents, batch_size=33, backend=backend)
    want_labels, want_sim = brute_assign(x, cents)
    np.testing.assert_array_equal(labels, want_labels)
    np.testing.assert_allclose(sim, want_sim, rtol=1e-5, atol=1e-6)


def test_assign_reports_global_row_of_bad_batch():
    x = np.ones((100, 4), np.float32)
    x[57] = np.nan
    with pytest.raises(ValueError, match=r"rows \[57\]"):
        assign(x, np.ones((2, 4), np.float32), batch_size=10)


def test_assign_shape_mismatch():
    with pytest.raises(ValueError, match="width d=4"):
        assign(np.ones((3, 4), np.float32), np.ones((2, 5), np.float32))


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_kmeans_separates_planted_clusters_and_is_seeded(backend):
    rng = np.random.default_rng(1)
    centers = np.eye(8, dtype=np.float32)[:4] * 10
    x = np.concatenate([c + rng.standard_normal((50, 8)).astype(np.float32) for c in centers])
    a = kmeans(x, 4, seed=3, backend=backend)
    b = kmeans(x, 4, seed=3, backend=backend)
    np.testing.assert_array_equal(a.labels, b.labels)
    # each planted group maps to one cluster
    for g in range(4):
        assert len(np.unique(a.labels[g * 50 : (g + 1) * 50])) == 1
    assert sorted(a.sizes.tolist()) == [50, 50, 50, 50]
    np.testing.assert_allclose(np.linalg.norm(a.centroids, axis=1), 1, rtol=1e-5)
    want_labels, want_sim = brute_assign(x, a.centroids)
    np.testing.assert_array_equal(a.labels, want_labels)
    np.testing.assert_allclose(a.sim, want_sim, rtol=1e-5)
    assert a.params["max_points_per_centroid"] == 256 and a.params["n_train"] == 200


def test_torch_lloyd_reseeds_empty_clusters():
    # 5 distinct points, two of them 40x more frequent: a random init picks duplicates,
    # leaving clusters empty unless they are re-seeded
    pts = np.eye(5, dtype=np.float32)
    x = np.concatenate([np.repeat(pts[:2], 40, axis=0), pts[2:]])
    for seed in range(5):
        c = kmeans(x, 5, seed=seed, backend="torch")
        assert (c.sizes > 0).all()
        np.testing.assert_allclose(c.sim, 1.0, atol=1e-6)  # every point sits on a centroid


def test_non_spherical_assign_uses_euclidean_distance():
    # x at 30 degrees; c0 at 0 degrees (norm 1), c1 at 50 degrees but norm 3: nearer in angle,
    # farther in Euclidean distance from the (unit) row
    angle = np.deg2rad([30.0, 50.0])
    x = np.array([[np.cos(angle[0]), np.sin(angle[0])]], np.float32)
    cents = np.array([[1.0, 0.0], 3 * np.array([np.cos(angle[1]), np.sin(angle[1])])], np.float32)
    for backend in ("torch", "faiss"):
        assert assign(x, cents, spherical=True, backend=backend)[0].tolist() == [1]
        assert assign(x, cents, spherical=False, backend=backend)[0].tolist() == [0]
    with pytest.raises(ValueError, match="backend"):
        assign(x, cents, backend="sklearn")


def test_kmeans_samples_at_most_k_times_max_points():
    x = np.random.default_rng(2).standard_normal((500, 4)).astype(np.float32)
    c = kmeans(x, 3, max_points_per_centroid=10)
    assert c.params["n_train"] == 30 and c.labels.shape == (500,)


@pytest.mark.parametrize("k", [1, 9])
def test_kmeans_k_one_and_k_equals_n(k):
    x = np.random.default_rng(3).standard_normal((9, 4)).astype(np.float32)
    c = kmeans(x, k)
    assert c.k == k and c.labels.max() < k
    if k == 9:
        assert sorted(c.labels.tolist()) == list(range(9))  # every point its own centroid


@pytest.mark.parametrize(
    "bad, k, match",
    [
        (np.ones((3, 2), np.float32), 4, "k=4"),
        (np.ones((0, 2), np.float32), 1, "empty"),
        (np.ones((3, 2), np.float32), 0, "positive"),
        (np.ones((3, 2), np.int64), 1, "floating"),
    ],
)
def test_kmeans_errors(bad, k, match):
    with pytest.raises((ValueError, TypeError), match=match):
        kmeans(bad, k)


def test_kmeans_names_nan_row_of_the_training_sample():
    x = np.random.default_rng(0).standard_normal((3000, 4)).astype(np.float32)
    x[1234] = np.nan
    with pytest.raises(ValueError, match="1234"):
        kmeans(x, 2, max_points_per_centroid=2000)


def test_chunked_rows_read_like_one_array(tmp_path):
    rng = np.random.default_rng(0)
    parts = [rng.standard_normal((n, 3)).astype(np.float16) for n in (5, 1, 7)]
    for i, p in enumerate(parts):
        np.save(tmp_path / f"emb_{i}.npy", p)
    rows = open_embeddings(tmp_path)
    assert isinstance(rows, ChunkedRows) and rows.shape == (13, 3)
    whole = np.concatenate(parts)
    idx = np.array([12, 0, 5, 6, 5, 4])
    np.testing.assert_array_equal(rows[idx], whole[idx])
    np.testing.assert_array_equal(rows[3:9], whole[3:9])
    labels, _ = assign(rows, whole[[0, 7]].astype(np.float32), batch_size=4)
    want, _ = brute_assign(whole.astype(np.float32), whole[[0, 7]].astype(np.float32))
    np.testing.assert_array_equal(labels, want)


def test_row_subset_reads_lazily_like_fancy_indexing():
    x = np.arange(40, dtype=np.float32).reshape(10, 4)
    sub = RowSubset(x, np.array([9, 2, 5]))
    assert sub.shape == (3, 4) and len(sub) == 3
    np.testing.assert_array_equal(sub[[2, 0]], x[[5, 9]])
    np.testing.assert_array_equal(sub[1:], x[[2, 5]])
    with pytest.raises(IndexError):
        sub[[3]]
    with pytest.raises(IndexError):
        RowSubset(x, np.array([10]))


def test_open_embeddings_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        open_embeddings(tmp_path / "missing.npy")
    np.save(tmp_path / "vec.npy", np.ones(4))
    with pytest.raises(ValueError, match="2-D"):
        open_embeddings(tmp_path / "vec.npy")
    (tmp_path / "junk.npy").write_bytes(b"not numpy")
    with pytest.raises(ValueError, match="not a readable"):
        open_embeddings(tmp_path / "junk.npy")


@pytest.mark.parametrize(
    "n, keep, want", [(10, 0.25, 3), (10, 1.0, 10), (10, 3, 3), (10, 0, 0), (7, 0.5, 4), (0, 0.5, 0)]
)
def test_keep_count(n, keep, want):
    assert keep_count(n, keep) == want


@pytest.mark.parametrize("keep", [0.0, 1.5, -1, 11, True, "half"])
def test_keep_count_errors(keep):
    with pytest.raises((ValueError, TypeError)):
        keep_count(10, keep)


def test_top_k_mask_ties_go_to_lower_index():
    scores = np.array([1.0, 3.0, 3.0, 2.0, 3.0])
    assert top_k_mask(scores, 2).tolist() == [False, True, True, False, False]
    assert top_k_mask(scores, 2, largest=False).tolist() == [True, False, False, True, False]


def test_lazy_exports_resolve_on_access_and_name_missing_dependencies():
    from prunecore.lazy import lazy_exports

    getattr_ = lazy_exports("pkg", {"dumps": "json", "json": "json", "x": "no_such_module_xyz"}, install_hint="pip it")
    import json

    assert getattr_("dumps") is json.dumps
    assert getattr_("json") is json  # a name equal to its module's last part is the module
    with pytest.raises(AttributeError, match="module 'pkg' has no attribute 'y'"):
        getattr_("y")
    with pytest.raises(ImportError, match="x needs its optional dependencies: pip it"):
        getattr_("x")


def test_open_embeddings_takes_a_glob_pattern(tmp_path):
    for i in (1, 0):
        np.save(tmp_path / f"img_emb_{i}.npy", np.full((2, 3), i, np.float32))
    rows = open_embeddings(str(tmp_path / "img_emb_*.npy"))
    assert np.asarray(rows[0:4])[:, 0].tolist() == [0, 0, 1, 1]
    with pytest.raises(FileNotFoundError, match="no file matches"):
        open_embeddings(str(tmp_path / "none_*.npy"))
