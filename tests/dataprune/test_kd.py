"""KD loss against a hand computation; alpha schedule; teacher-logit cache and resume."""

import math

import numpy as np
import pytest
import torch

from dataprune import TeacherLogitCache, fill_teacher_cache, kd_alpha, kd_loss


def test_kd_loss_matches_hand_computation():
    s = torch.tensor([[1.0, 2.0, 0.5]])
    t = torch.tensor([[0.0, 3.0, 1.0]])
    y = torch.tensor([1])
    T, alpha = 2.0, 0.3
    ps = [math.exp(v / T) for v in (1.0, 2.0, 0.5)]
    pt = [math.exp(v / T) for v in (0.0, 3.0, 1.0)]
    ps = [p / sum(ps) for p in ps]
    pt = [p / sum(pt) for p in pt]
    kl = sum(a * math.log(a / b) for a, b in zip(pt, ps))
    z = [math.exp(v) for v in (1.0, 2.0, 0.5)]
    ce = -math.log(z[1] / sum(z))
    want = (1 - alpha) * ce + alpha * T * T * kl
    got = kd_loss(s, t, y, alpha=alpha, temperature=T)
    assert got.item() == pytest.approx(want, rel=1e-6)


def test_alpha_zero_is_cross_entropy_and_gradient_flows():
    torch.manual_seed(0)
    s = torch.randn(8, 5, requires_grad=True)
    t = torch.randn(8, 5, requires_grad=True)
    y = torch.randint(0, 5, (8,))
    ce = torch.nn.functional.cross_entropy(s, y)
    assert kd_loss(s, t, y, alpha=0.0).item() == pytest.approx(ce.item(), rel=1e-6)
    loss = kd_loss(s, t, y, alpha=0.7)
    loss.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None  # the teacher is never trained through the loss
    assert kd_loss(t.detach(), t.detach(), None, alpha=1.0).item() == pytest.approx(0, abs=1e-6)


def test_kd_loss_errors():
    with pytest.raises(ValueError, match="alpha"):
        kd_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), alpha=2)
    with pytest.raises(ValueError, match=r"\(B, C\)"):
        kd_loss(torch.zeros(2, 3), torch.zeros(2, 4), None, alpha=1.0)
    with pytest.raises(ValueError, match="targets"):
        kd_loss(torch.zeros(2, 3), torch.zeros(2, 3), None, alpha=0.5)


def test_kd_alpha_schedule():
    assert kd_alpha(1.0) == pytest.approx(0.5)
    assert kd_alpha(0.1) == pytest.approx(1.0)
    assert kd_alpha(0.05) == pytest.approx(1.0)
    fs = np.linspace(0.01, 1.0, 50)
    alphas = [kd_alpha(f) for f in fs]
    assert all(a >= b for a, b in zip(alphas, alphas[1:]))
    with pytest.raises(ValueError):
        kd_alpha(0.0)


class CountingTeacher(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.seen = 0
        self.w = torch.nn.Linear(3, 4)

    def forward(self, x):
        self.seen += x.shape[0]
        return self.w(x)


def test_teacher_cache_runs_teacher_once_and_resumes(tmp_path):
    torch.manual_seed(0)
    keys = [f"k{i}" for i in range(10)]
    inputs = torch.randn(10, 3)
    teacher = CountingTeacher()
    batches = [(keys[i : i + 4], inputs[i : i + 4]) for i in range(0, 10, 4)]
    cache = TeacherLogitCache.create(tmp_path / "c", keys, 4, storage_dtype="float32")
    fill_teacher_cache(cache, teacher, batches[:1], progress=False)  # "killed" after 1 batch
    assert cache.missing() == keys[4:]
    reopened = TeacherLogitCache.create(tmp_path / "c", keys, 4, storage_dtype="float32")
    fill_teacher_cache(reopened, teacher, batches, progress=False)
    assert teacher.seen == 10 and reopened.complete
    got = reopened.read(["k7", "k0"])
    want = teacher.w(inputs[[7, 0]]).detach()
    torch.testing.assert_close(got, want)
    with pytest.raises(KeyError, match="zz"):
        reopened.read(["zz"])
    with pytest.raises(ValueError, match="other keys"):
        TeacherLogitCache.create(tmp_path / "c", keys[:3], 4)


def test_teacher_cache_refuses_unwritten_and_bad_logits(tmp_path):
    cache = TeacherLogitCache.create(tmp_path / "c", ["a", "b"], 2)
    with pytest.raises(KeyError, match="never written"):
        cache.read(["a"])
    with pytest.raises(ValueError, match="NaN"):
        cache.write(["a"], np.array([[np.nan, 1.0]]))
    with pytest.raises(ValueError, match="duplicate"):
        TeacherLogitCache.create(tmp_path / "d", ["a", "a"], 2)
