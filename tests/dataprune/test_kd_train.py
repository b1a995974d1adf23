"""dataprune.train: fixed-recipe trainer with optional cached-teacher distillation."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dataprune import TeacherLogitCache, kd_loss
from dataprune.train import accuracy, predict_logits, train_classifier


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one intra-op thread avoids OpenMP spinning on a shared 2-core box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def blobs(n=240, d=6, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(c, d, generator=g) * 3
    y = torch.arange(n) % c
    x = centers[y] + torch.randn(n, d, generator=g)
    return x, y


def reference_train(
    model, x, y, *, epochs, batch_size, lr, weight_decay, min_steps, seed, teacher=None, alpha=0.0, temperature=4.0
):
    """Brute-force restatement of the documented recipe (AdamW + cosine, seeded perms)."""
    n = x.shape[0]
    total = max(epochs * math.ceil(n / batch_size), min_steps)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    model.train()
    step = 0
    while step < total:
        perm = torch.randperm(n, generator=gen)
        for s in range(0, n, batch_size):
            if step >= total:
                break
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
            idx = perm[s : s + batch_size]
            z = model(x[idx])
            if teacher is None or alpha == 0:
                loss = F.cross_entropy(z, y[idx])
            else:
                t = teacher[idx]
                kl = (
                    F.softmax(t / temperature, -1)
                    * (F.log_softmax(t / temperature, -1) - F.log_softmax(z / temperature, -1))
                ).sum(-1) * temperature**2
                loss = ((1 - alpha) * F.cross_entropy(z, y[idx], reduction="none") + alpha * kl).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
    return total


@pytest.mark.parametrize("alpha", [0.0, 0.6])
def test_matches_reference_recipe(alpha):
    x, y = blobs()
    teacher = torch.randn(x.shape[0], 3) * 2
    kw = dict(epochs=2, batch_size=32, lr=1e-2, weight_decay=1e-3, min_steps=20, seed=5)
    torch.manual_seed(0)
    a = torch.nn.Linear(6, 3)
    b = torch.nn.Linear(6, 3)
    b.load_state_dict(a.state_dict())
    hist = train_classifier(a, x, y, teacher_logits=teacher, alpha=alpha, **kw)
    total = reference_train(b, x, y, teacher=teacher, alpha=alpha, **kw)
    assert hist["steps"] == total == 20  # min_steps wins over 2 epochs of 8 steps
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


def test_learns_separable_data_and_accuracy_is_exact():
    x, y = blobs(seed=1)
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 3)
    train_classifier(model, x, y, epochs=10, batch_size=64, lr=1e-1, seed=0)
    pred = predict_logits(model, x).argmax(1)
    assert accuracy(model, x, y) == pytest.approx(float((pred == y).float().mean()))
    assert accuracy(model, x, y) > 0.95


def test_pure_distillation_follows_teacher_not_labels():
    """alpha=1: the labels are ignored; the student copies a teacher that permutes classes."""
    x, y = blobs(seed=2)
    torch.manual_seed(0)
    teacher_model = torch.nn.Linear(6, 3)
    train_classifier(teacher_model, x, y, epochs=10, batch_size=64, lr=1e-1, seed=0)
    perm = torch.tensor([2, 0, 1])
    teacher = predict_logits(teacher_model, x)[:, perm]  # class j now means class perm[j]
    wrong_labels = torch.zeros_like(y)
    student = torch.nn.Linear(6, 3)
    train_classifier(
        student,
        x,
        wrong_labels,
        epochs=15,
        batch_size=64,
        lr=1e-1,
        seed=0,
        teacher_logits=teacher,
        alpha=1.0,
        temperature=2.0,
    )
    agree = (predict_logits(student, x).argmax(1) == teacher.argmax(1)).float().mean()
    assert agree > 0.95
    final = kd_loss(predict_logits(student, x), teacher, None, alpha=1.0, temperature=2.0)
    assert float(final) < 0.5


def test_with_teacher_logit_cache_roundtrip(tmp_path):
    x, y = blobs(n=60)
    keys = [f"row{i}" for i in range(60)]
    cache = TeacherLogitCache.create(tmp_path / "t", keys, 3, storage_dtype="float32")
    logits = torch.randn(60, 3)
    cache.write(keys, logits)
    subset = np.arange(0, 60, 3)
    cached = cache.read([keys[i] for i in subset])
    torch.testing.assert_close(cached, logits[subset])
    model = torch.nn.Linear(6, 3)
    hist = train_classifier(
        model, x[subset], y[subset], epochs=1, batch_size=8, seed=0, teacher_logits=cached, alpha=0.5
    )
    assert hist["steps"] == 3 and np.isfinite(hist["loss"])


def test_errors_are_clear():
    x, y = blobs(n=30)
    model = torch.nn.Linear(6, 3)
    with pytest.raises(ValueError, match="teacher_logits"):
        train_classifier(model, x, y, epochs=1, alpha=0.5)
    with pytest.raises(ValueError, match=r"teacher_logits shape"):
        train_classifier(model, x, y, epochs=1, alpha=0.5, teacher_logits=torch.zeros(29, 3))
    with pytest.raises(ValueError, match="NaN"):
        train_classifier(model, x, y, epochs=1, alpha=0.5, teacher_logits=torch.full((30, 3), float("nan")))
    with pytest.raises(ValueError, match="labels shape"):
        train_classifier(model, x, y[:10], epochs=1)
    with pytest.raises(TypeError, match="floating-point"):
        train_classifier(model, x.long(), y, epochs=1)
    with pytest.raises(ValueError, match="alpha"):
        train_classifier(model, x, y, epochs=1, alpha=1.5, teacher_logits=torch.zeros(30, 3))
    with pytest.raises(ValueError, match="empty"):
        train_classifier(model, x[:0], y[:0], epochs=1)
    with pytest.raises(ValueError, match="at least one step"):
        train_classifier(model, x, y, epochs=0)
