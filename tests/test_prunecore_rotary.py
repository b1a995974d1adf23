"""prunecore.rotary: the one rotate-half RoPE (tables, rotation)."""

from __future__ import annotations

import torch

from prunecore.rotary import apply_rotary, rotary_cos_sin, rotate_half


def test_rotate_half_is_a_quarter_turn():
    x = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(rotate_half(rotate_half(x)), -x)
    assert torch.equal(rotate_half(x)[..., :4], -x[..., 4:])


def test_apply_rotary_rotates_pairs_by_position_times_frequency():
    x = torch.randn(1, 2, 5, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    cos, sin = rotary_cos_sin(torch.arange(5).unsqueeze(0), head_dim=8, theta=10000.0)
    assert cos.shape == (1, 1, 5, 8) and cos.dtype == torch.float32
    y = apply_rotary(x, cos, sin)
    assert y.dtype == torch.float64  # computed in cos's dtype, returned in x's
    assert torch.equal(y[:, :, 0], x[:, :, 0].float().double())  # position 0: identity
    pair = lambda t: t[..., :4] ** 2 + t[..., 4:] ** 2  # noqa: E731 (each (i, i + D/2) pair keeps its norm)
    torch.testing.assert_close(pair(y), pair(x), rtol=1e-5, atol=1e-5)
    angle = torch.atan2(y[0, 0, 1, 4], y[0, 0, 1, 0]) - torch.atan2(x[0, 0, 1, 4], x[0, 0, 1, 0])
    torch.testing.assert_close(torch.remainder(angle, 2 * torch.pi).float(), torch.tensor(1.0), rtol=1e-5, atol=1e-5)
