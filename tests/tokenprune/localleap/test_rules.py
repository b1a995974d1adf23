"""The one-step commit rules against brute-force per-position implementations."""

import math
import random

import pytest
import torch

from tests.helpers.localleap_refs import ref_eb, ref_fast, ref_localleap, ref_topk
from tokenprune.localleap.rules import eb_sampler, fastdllm_threshold, llada_schedule, llada_topk, localleap_transfer

# ---------------------------------------------------------------- brute-force references


def _random_case(seed, B=4, L=16, levels=None):
    g = torch.Generator().manual_seed(seed)
    if levels is None:
        conf = torch.rand(B, L, generator=g, dtype=torch.float64)
    else:  # few distinct values -> many ties and values exactly at thresholds
        lv = torch.tensor(levels, dtype=torch.float64)  # exact thresholds
        conf = lv[torch.randint(len(lv), (B, L), generator=g)]
    masked = torch.rand(B, L, generator=g) < 0.7
    return conf, masked


def _lists(t):
    return t.tolist()


SEEDS = range(40)


@pytest.mark.parametrize("seed", SEEDS)
def test_localleap_matches_bruteforce(seed):
    levels = None if seed % 2 else [0.1, 0.5, 0.75, 0.8, 0.9, 0.95]
    conf, masked = _random_case(seed, levels=levels)
    radius = seed % 6
    got = localleap_transfer(conf, masked, threshold=0.9, relaxed_threshold=0.75, radius=radius)
    assert got.dtype == torch.bool and got.shape == conf.shape
    assert _lists(got) == ref_localleap(_lists(conf), _lists(masked), 0.9, 0.75, radius)


@pytest.mark.parametrize("seed", SEEDS)
def test_fastdllm_matches_bruteforce(seed):
    levels = None if seed % 2 else [0.2, 0.9, 0.9, 0.95]
    conf, masked = _random_case(seed, levels=levels)
    got = fastdllm_threshold(conf, masked, threshold=0.9)
    assert _lists(got) == ref_fast(_lists(conf), _lists(masked), 0.9)


@pytest.mark.parametrize("seed", SEEDS)
def test_llada_topk_matches_bruteforce(seed):
    levels = None if seed % 2 else [0.3, 0.6, 0.6, 0.9]
    conf, masked = _random_case(seed, levels=levels)
    k = [random.Random(seed * 7 + b).randint(0, 6) for b in range(conf.shape[0])]
    got = llada_topk(conf, masked, torch.tensor(k))
    assert _lists(got) == ref_topk(_lists(conf), _lists(masked), k)
    got_int = llada_topk(conf, masked, 3)
    assert _lists(got_int) == ref_topk(_lists(conf), _lists(masked), 3)


@pytest.mark.parametrize("seed", SEEDS)
def test_eb_matches_bruteforce(seed):
    conf, masked = _random_case(seed)
    g = torch.Generator().manual_seed(1000 + seed)
    # entropies: many near zero so that prefixes of several tokens pass the bound
    ent = torch.rand(conf.shape, generator=g) ** 6 * 0.01
    ent = torch.where(torch.rand(conf.shape, generator=g) < 0.2, ent * 100, ent)
    for gamma in (0.0, 1e-3, 1e-2):
        got = eb_sampler(conf, masked, ent, gamma=gamma)
        assert _lists(got) == ref_eb(_lists(conf), _lists(masked), _lists(ent.double()), gamma)


def test_no_anchor_localleap_equals_fastdllm():
    g = torch.Generator().manual_seed(0)
    conf = torch.rand(8, 32, generator=g) * 0.89  # nothing reaches 0.9: no anchor
    masked = torch.rand(8, 32, generator=g) < 0.8
    a = localleap_transfer(conf, masked, radius=4)
    b = fastdllm_threshold(conf, masked)
    assert torch.equal(a, b)
    assert (a.sum(-1) == masked.any(-1).long()).all()  # all below threshold: exactly one


def test_all_below_threshold_commits_exactly_one_top1():
    conf = torch.tensor([[0.1, 0.5, 0.3, 0.5], [0.2, 0.2, 0.2, 0.2]])
    masked = torch.tensor([[True, True, True, True], [False, True, True, True]])
    for fn in (lambda c, m: localleap_transfer(c, m), lambda c, m: fastdllm_threshold(c, m)):
        got = fn(conf, masked)
        # ties resolved to the lower index: row 0 -> position 1, row 1 -> position 1
        assert got.tolist() == [[False, True, False, False], [False, True, False, False]]


def test_anchor_at_block_edges_and_window():
    # anchor at the first and at the last position; relaxed neighbours within radius 2
    conf = torch.tensor([[0.95, 0.8, 0.8, 0.8, 0.5, 0.8, 0.8, 0.8, 0.8, 0.95]])
    masked = torch.ones_like(conf, dtype=torch.bool)
    got = localleap_transfer(conf, masked, threshold=0.9, relaxed_threshold=0.75, radius=2)
    assert got.tolist() == [[True, True, True, False, False, False, False, True, True, True]]


def test_overlapping_windows_and_decoded_not_anchor():
    conf = torch.tensor([[0.8, 0.91, 0.8, 0.8, 0.92, 0.8, 0.8, 0.99, 0.8]])
    masked = torch.tensor([[True, True, True, True, True, True, True, False, True]])
    got = localleap_transfer(conf, masked, radius=1)
    # windows of 1 and 4 overlap at 2-3; position 7 is decoded (not an anchor), so 8 needs 0.9
    assert got.tolist() == [[True, True, True, True, True, True, False, False, False]]
    assert not (got & ~masked).any()


def test_batch_with_different_masks():
    conf = torch.tensor([[0.95, 0.8, 0.1], [0.95, 0.8, 0.1], [0.5, 0.8, 0.1]])
    masked = torch.tensor([[True, True, True], [False, True, True], [False, False, False]])
    got = localleap_transfer(conf, masked, radius=1)
    assert got.tolist() == [[True, True, False], [False, True, False], [False, False, False]]


def test_radius_zero_and_huge():
    conf = torch.tensor([[0.95, 0.8, 0.8, 0.8]])
    masked = torch.ones_like(conf, dtype=torch.bool)
    assert localleap_transfer(conf, masked, radius=0).tolist() == [[True, False, False, False]]
    assert localleap_transfer(conf, masked, radius=100).tolist() == [[True, True, True, True]]


def test_llada_schedule():
    s = llada_schedule(torch.tensor([10, 3, 0]), 4)
    assert s.tolist() == [[3, 3, 2, 2], [1, 1, 1, 0], [0, 0, 0, 0]]
    assert llada_schedule(32, 32).tolist() == [[1] * 32]


def test_errors():
    conf = torch.rand(2, 4)
    masked = torch.ones(2, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="shape"):
        localleap_transfer(conf[0], masked[0])
    with pytest.raises(TypeError, match="bool"):
        localleap_transfer(conf, masked.long())
    with pytest.raises(ValueError, match="NaN"):
        fastdllm_threshold(torch.full((2, 4), math.nan), masked)
    with pytest.raises(ValueError, match="relaxed_threshold"):
        localleap_transfer(conf, masked, threshold=0.5, relaxed_threshold=0.8)
    with pytest.raises(ValueError, match="radius"):
        localleap_transfer(conf, masked, radius=-1)
    with pytest.raises(ValueError, match="entropy"):
        eb_sampler(conf, masked, torch.rand(3, 4))
    with pytest.raises(ValueError, match="k must"):
        llada_topk(conf, masked, torch.tensor([1, 2, 3]))
