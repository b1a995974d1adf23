"""One word per meaning in dataprune: the method names, ``order``, one return type per
function, ``keep`` first with the same error for the same bad budget; the old spellings
are deprecation aliases for one release."""

import inspect

import numpy as np
import pytest

import dataprune
from dataprune import dbp, random_subset, semdedup, semdedup_sweep, ssp
from dataprune.outofcore import prune_in_memory, prune_out_of_core
from prunecore import kmeans


@pytest.fixture(scope="module")
def data():
    x = np.random.default_rng(0).standard_normal((120, 8)).astype(np.float32)
    x = np.concatenate([x, x[:15] + 1e-3])  # planted near-copies for SemDeDup
    return x, kmeans(x, 4, seed=0)


def assert_same_selection(a, b):
    np.testing.assert_array_equal(a.keep, b.keep)
    np.testing.assert_array_equal(a.reasons, b.reasons)
    np.testing.assert_array_equal(a.scores, b.scores)


def test_old_function_names_warn_and_give_the_same_selection(data):
    x, clustering = data
    with pytest.warns(DeprecationWarning, match=r"dataprune\.prune_dbp is deprecated.*use dataprune\.dbp"):
        old = dataprune.prune_dbp(x, 0.5, clustering=clustering, temperature=0.5)
    assert_same_selection(old, dbp(x, 0.5, clustering=clustering, temperature=0.5))
    with pytest.warns(DeprecationWarning, match=r"dataprune\.prune_ssp is deprecated.*use dataprune\.ssp"):
        old = dataprune.prune_ssp(x, 0.5, clustering=clustering)
    assert_same_selection(old, ssp(x, 0.5, clustering=clustering))
    assert inspect.signature(dataprune.prune_dbp) == inspect.signature(dbp)


@pytest.mark.parametrize("order", ["hard", "easy"])
def test_ssp_order_is_the_word_of_dbp_and_semdedup_and_mode_is_deprecated(data, order):
    x, clustering = data
    new = ssp(x, 0.4, clustering=clustering, order=order)
    with pytest.warns(DeprecationWarning, match=r"ssp\(mode=\.\.\.\) is deprecated.*use order="):
        old = ssp(x, 0.4, clustering=clustering, mode=order)
    assert_same_selection(old, new)
    # hard = farthest from the centroid first in all three methods
    far_first = ssp(x, 0.4, clustering=clustering, order="hard").scores
    kept = new.keep
    if order == "hard":
        assert far_first[kept].min() >= far_first[~kept].max()
    else:
        assert far_first[kept].max() <= far_first[~kept].min()
    for method in (ssp, dbp, semdedup_sweep):
        assert inspect.signature(method).parameters["order"].default == "hard"


def test_semdedup_always_returns_one_selection_and_the_sweep_a_dict(data):
    x, clustering = data
    for eps in (0.05, np.float32(0.05), 0):
        assert isinstance(semdedup(x, eps, clustering=clustering), dataprune.Selection)
    sweep = semdedup_sweep(x, [0.01, 0.05], clustering=clustering)
    assert list(sweep) == [0.01, 0.05] and all(isinstance(s, dataprune.Selection) for s in sweep.values())
    assert_same_selection(sweep[0.05], semdedup(x, 0.05, clustering=clustering))
    assert sweep[0.05].n_kept < x.shape[0]  # the planted copies are dropped
    with pytest.warns(DeprecationWarning, match=r"use semdedup_sweep"):
        old = semdedup(x, [0.01, 0.05], clustering=clustering)
    assert list(old) == [0.01, 0.05]
    for e in old:
        assert_same_selection(old[e], sweep[e])
    with pytest.raises(ValueError, match=r"eps must be a number in \[0, 2\), got 'abc'"):
        semdedup(x, "abc", clustering=clustering)


def test_keep_is_first_after_the_data_in_every_method():
    for method in (dbp, ssp):
        assert list(inspect.signature(method).parameters)[:2] == ["emb", "keep"]
    assert list(inspect.signature(random_subset).parameters)[:2] == ["n", "keep"]
    for chain in (prune_out_of_core, prune_in_memory):
        params = inspect.signature(chain).parameters
        assert list(params)[1] == "keep" and params["keep"].kind is inspect.Parameter.KEYWORD_ONLY


@pytest.mark.parametrize("keep", [1.5, -0.1, True, "half", -3])
def test_the_same_bad_budget_gives_the_same_error_everywhere(data, keep, tmp_path):
    x, clustering = data
    calls = [
        lambda: dbp(x, keep, clustering=clustering, temperature=0.5),
        lambda: ssp(x, keep, clustering=clustering),
        lambda: random_subset(x.shape[0], keep, seed=0),
        # checked before any work, also when no method step would use it
        lambda: prune_in_memory(x, keep=keep, k=2, eps=0.1, method=None),
        lambda: prune_out_of_core(x, keep=keep, k=2, eps=0.1, method="ssp", workdir=tmp_path),
    ]
    errors = []
    for call in calls:
        with pytest.raises((TypeError, ValueError)) as info:
            call()
        errors.append((type(info.value), str(info.value)))
    assert len(set(errors)) == 1, errors
    assert "keep" in errors[0][1]


def test_teacher_cache_storage_dtype_and_its_deprecated_name(tmp_path):
    cache = dataprune.TeacherLogitCache.create(tmp_path / "new", ["a", "b"], 3, storage_dtype="float32")
    assert cache.logits.dtype == np.float32 and cache.meta["dtype"] == "float32"  # the file keeps its key
    with pytest.warns(DeprecationWarning, match=r"create\(dtype=\.\.\.\) is deprecated.*storage_dtype="):
        old = dataprune.TeacherLogitCache.create(tmp_path / "old", ["a", "b"], 3, dtype="float32")
    assert old.logits.dtype == np.float32
    assert dataprune.TeacherLogitCache.create(tmp_path / "default", ["a"], 2).logits.dtype == np.float16
