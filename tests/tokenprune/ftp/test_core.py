"""FTP pure parts: router features, top-k, static router, router I/O, losses, GA."""

import math

import numpy as np
import pytest
import torch

from tokenprune.ftp import (
    RandomRouter,
    RouteInputs,
    StaticRouter,
    TokenRouter,
    keep_topk,
    normalised_positions,
    score_ranks,
)
from tokenprune.ftp.losses import achieved_sparsity, distill_loss, guide_loss, guide_weight, sparsity_loss
from tokenprune.ftp.schedule import project_to_mean, search_schedule, uniform_schedule
from tokenprune.ftp.train import calibration_windows, contiguous_windows


def test_normalised_positions_brute_force():
    valid = torch.tensor([[False, False, True, True, True], [True, True, True, True, True], [False] * 4 + [True]])
    got = normalised_positions(valid)
    for b in range(valid.shape[0]):
        idx = [i for i in range(5) if valid[b, i]]
        for j, i in enumerate(idx):
            assert got[b, i].item() == pytest.approx(j / max(len(idx) - 1, 1))
        for i in range(5):
            if not valid[b, i]:
                assert got[b, i].item() == 0.0


def test_score_ranks_brute_force():
    g = torch.Generator().manual_seed(0)
    score = torch.rand(3, 7, generator=g)
    valid = torch.ones(3, 7, dtype=torch.bool)
    valid[1, :2] = False
    got = score_ranks(score, valid)
    for b in range(3):
        idx = [i for i in range(7) if valid[b, i]]
        order = sorted(idx, key=lambda i: -score[b, i].item())
        for r, i in enumerate(order):
            assert got[b, i].item() == pytest.approx(r / (len(idx) - 1))
    assert (got[1, :2] == 1).all()


def test_keep_topk_counts_and_choice():
    prob = torch.tensor([[0.9, 0.1, 0.5, 0.7, 0.2], [0.3, 0.3, 0.8, 0.1, 0.9]])
    valid = torch.tensor([[True] * 5, [False, True, True, True, True]])
    keep = keep_topk(prob, valid, sparsity=0.4)
    assert keep[0].tolist() == [True, False, True, True, False]  # floor(0.6*5+0.5)=3
    assert keep[1].tolist() == [False, False, True, False, True]  # floor(0.6*4+0.5)=2 among valid
    assert keep_topk(prob, valid, sparsity=0.0).sum(1).tolist() == [5, 4]


def _inputs(T, s, decode=False):
    valid = torch.ones(1, T, dtype=torch.bool)
    return RouteInputs(
        position=normalised_positions(valid),
        score=torch.zeros(1, T),
        rank=torch.zeros(1, T),
        sparsity=s,
        valid=valid,
        decode=decode,
    )


def test_static_router_keeps_sink_then_recent():
    T = 10
    keep = keep_topk(StaticRouter().keep_prob(_inputs(T, 0.6)), torch.ones(1, T, dtype=torch.bool), sparsity=0.6)
    assert torch.nonzero(keep[0]).flatten().tolist() == [0, 7, 8, 9]
    inp = _inputs(1, 0.5, decode=True)
    r = StaticRouter()
    assert r.decode_keep(r.keep_prob(inp), inp).all()


def test_random_router_seeded():
    a, b = RandomRouter(3), RandomRouter(3)
    assert torch.equal(a.keep_prob(_inputs(8, 0.3)), b.keep_prob(_inputs(8, 0.3)))
    a.reset()
    b2 = RandomRouter(3)
    assert torch.equal(a.keep_prob(_inputs(8, 0.3)), b2.keep_prob(_inputs(8, 0.3)))


def test_token_router_init_is_seeded_and_ignores_global_rng():
    """Issue 22: an untrained TokenRouter() depended on the global RNG (decode sparsity 0.0 or 0.48 by run)."""
    torch.manual_seed(1)
    a = TokenRouter()
    torch.manual_seed(2)
    state = torch.get_rng_state()
    b = TokenRouter()
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is neither read nor advanced
    c, d = TokenRouter(seed=1), TokenRouter(hidden=8, seed=0)
    for (name, x), y, z in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(x, y) and not torch.equal(x, z), name
    # torch's default Linear initialisation: weight and bias in (-1/sqrt(fan_in), 1/sqrt(fan_in))
    for layer, fan_in in ((d.net[0], 4), (d.net[2], 8)):
        assert layer.weight.abs().max() <= fan_in**-0.5 and layer.weight.std() > 0.2 * fan_in**-0.5
        assert layer.bias.abs().max() <= fan_in**-0.5
    f = torch.rand(3, 7, 4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a(f), b(f))


def test_token_router_shapes_save_load(tmp_path):
    torch.manual_seed(0)
    r = TokenRouter(hidden=64)
    assert sum(p.numel() for p in r.parameters()) == 4 * 64 + 64 + 64 + 1
    f = torch.rand(2, 5, 4)
    p = r(f)
    assert p.shape == (2, 5) and ((p > 0) & (p < 1)).all()
    path = r.save(tmp_path / "router.safetensors", extra={"schedule": [0.1, 0.2]})
    r2 = TokenRouter.load(path)
    assert torch.equal(r2(f), p)
    assert TokenRouter.load_extra(path) == {"schedule": [0.1, 0.2]}
    assert path.stat().st_size < 10_000
    with pytest.raises(ValueError, match="end with 4"):
        r(torch.rand(2, 3))
    with pytest.raises(FileNotFoundError):
        TokenRouter.load(tmp_path / "missing.safetensors")


def test_losses_brute_force():
    g = torch.Generator().manual_seed(1)
    probs = torch.rand(3, 2, 6, generator=g) * 0.98 + 0.01
    static = torch.rand(3, 2, 6, generator=g) > 0.5
    valid = torch.ones(2, 6, dtype=torch.bool)
    valid[0, 0] = False
    # guide: BCE over valid entries
    tot, n = 0.0, 0
    for l in range(3):
        for b in range(2):
            for t in range(6):
                if valid[b, t]:
                    p, y = probs[l, b, t].item(), float(static[l, b, t])
                    tot += -(y * math.log(p) + (1 - y) * math.log(1 - p))
                    n += 1
    assert guide_loss(probs, static, valid).item() == pytest.approx(tot / n, rel=1e-5)
    # sparsity: sum_i max(target_i - achieved_i, 0)
    targets = [0.2, 0.6, 0.9]
    ach = []
    for l in range(3):
        vals = [probs[l, b, t].item() for b in range(2) for t in range(6) if valid[b, t]]
        ach.append(1 - sum(vals) / len(vals))
    assert achieved_sparsity(probs, valid).tolist() == pytest.approx(ach, rel=1e-5)
    want = sum(max(t - a, 0.0) for t, a in zip(targets, ach))
    assert sparsity_loss(probs, targets, valid).item() == pytest.approx(want, rel=1e-5)
    assert sparsity_loss(probs, [0.0, 0.0, 0.0], valid).item() == 0.0
    # distillation
    s, t = torch.randn(2, 6, 8, generator=g), torch.randn(2, 6, 8, generator=g)
    assert distill_loss(t, t).item() == 0.0
    want = ((s - t) ** 2).mean().item() / (t**2).mean().item()
    assert distill_loss(s, t).item() == pytest.approx(want, rel=1e-5)
    kl = (
        torch.nn.functional.kl_div(
            torch.log_softmax(s, -1), torch.log_softmax(t, -1), log_target=True, reduction="none"
        )
        .sum(-1)
        .mean()
    )
    assert distill_loss(s, t, kind="logits").item() == pytest.approx(kl.item(), rel=1e-5)
    with pytest.raises(ValueError, match="kind"):
        distill_loss(s, t, kind="cosine")


def test_guide_weight_decays():
    ws = [guide_weight(i, 11, start=1.0, end=0.1) for i in range(11)]
    assert ws[0] == pytest.approx(1.0) and ws[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(ws, ws[1:]))
    assert guide_weight(5, 11, curve="linear") == pytest.approx(0.5)
    with pytest.raises(ValueError):
        guide_weight(1, 10, curve="step")


def test_project_to_mean():
    rng = np.random.default_rng(0)
    x = rng.normal(0.3, 0.4, size=(50, 12))
    p = project_to_mean(x, 0.3, 0.0, 0.9)
    assert np.allclose(p.mean(1), 0.3, atol=1e-9)
    assert p.min() >= 0.0 and p.max() <= 0.9
    # a feasible vector is left alone
    v = np.linspace(0.1, 0.5, 12)
    assert np.allclose(project_to_mean(v, v.mean()), v)
    with pytest.raises(ValueError, match="outside"):
        project_to_mean(x, 0.95, 0.0, 0.9)


def test_ga_mean_constraint_determinism_and_progress():
    target_shape = np.linspace(0.0, 0.6, 8)

    def fit(s):
        return float(((s - target_shape) ** 2).sum())

    s1, h1 = search_schedule(fit, 8, target=0.3, population=12, generations=15, seed=4, progress=False)
    s2, h2 = search_schedule(fit, 8, target=0.3, population=12, generations=15, seed=4, progress=False)
    s3, _ = search_schedule(fit, 8, target=0.3, population=12, generations=15, seed=5, progress=False)
    assert np.array_equal(s1, s2) and h1 == h2
    assert not np.array_equal(s1, s3)
    assert s1.mean() == pytest.approx(0.3, abs=1e-9)
    for rec in h1:
        assert np.mean(rec["best_schedule"]) == pytest.approx(0.3, abs=1e-9)
    assert len(h1) == 16
    bests = [r["best"] for r in h1]
    assert all(a >= b for a, b in zip(bests, bests[1:]))  # elitism: never worse
    assert bests[-1] < 0.5 * bests[0]  # it actually searched
    assert fit(s1) < fit(np.full(8, 0.3))  # the uniform sparsity schedule
    with pytest.raises(ValueError):
        search_schedule(fit, 8, target=0.95, bounds=(0.0, 0.9), progress=False)


def test_windows():
    ids = torch.arange(1000)
    w = calibration_windows(ids, 16, 5, seed=1)
    assert w.shape == (5, 16) and torch.equal(w, calibration_windows(ids, 16, 5, seed=1))
    assert (w[:, 1:] - w[:, :-1] == 1).all()
    c = contiguous_windows(ids, 100)
    assert c.shape == (10, 100) and c[3, 0].item() == 300
    with pytest.raises(ValueError):
        calibration_windows(ids[:10], 16, 2)


def test_keep_alias_in_schedules():
    def fit(s):
        return float(np.sum((np.asarray(s) - np.linspace(0.5, 0.9, 4)) ** 2))

    k, hist = search_schedule(fit, 4, keep=0.7, population=6, generations=3, seed=0, progress=False)
    assert k.mean() == pytest.approx(0.7) and k.min() >= 0.1 - 1e-9 and k.max() <= 1.0 + 1e-9
    assert fit(hist[-1]["best_schedule"]) == pytest.approx(hist[-1]["best"], rel=1e-4)  # memo rounds to 1e-6
    s, _ = search_schedule(lambda v: fit(1.0 - v), 4, target=0.3, population=6, generations=3, seed=0, progress=False)
    assert np.allclose(1.0 - s, k)
    assert np.allclose(uniform_schedule(3, keep=0.75), 0.75) and np.allclose(uniform_schedule(3, 0.25), 0.25)
    with pytest.deprecated_call():
        assert np.allclose(uniform_schedule(3, target=0.25), 0.75)  # keep fractions whatever the spelling
    with pytest.raises(ValueError, match="not both"):
        search_schedule(fit, 4, target=0.3, keep=0.7, progress=False)
    assert keep_topk(torch.ones(1, 5), torch.ones(1, 5, dtype=torch.bool), keep=0.5).sum() == 3  # 2.5 rounds up
    assert keep_topk(torch.ones(1, 5), torch.ones(1, 5, dtype=torch.bool), sparsity=0.5).sum() == 3
