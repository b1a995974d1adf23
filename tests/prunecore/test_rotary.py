"""prunecore.rotary: the one rotate-half RoPE helper."""

import math

import torch

from prunecore.rotary import apply_rotary, rotary_cos_sin, rotate_half


def test_rotate_half_swaps_and_negates_halves():
    x = torch.arange(6.0).reshape(1, 6)
    assert rotate_half(x).tolist() == [[-3.0, -4.0, -5.0, 0.0, 1.0, 2.0]]


def test_rotary_tables_shape_and_angles():
    pos = torch.tensor([[0, 1, 5]])
    cos, sin = rotary_cos_sin(pos, head_dim=4, theta=100.0)
    assert cos.shape == sin.shape == (1, 1, 3, 4) and cos.dtype == torch.float32
    # channel 1 (and 3) has inv_freq = 100 ** (-2 / 4) = 0.1
    assert math.isclose(float(sin[0, 0, 2, 1]), math.sin(0.5), rel_tol=1e-6)
    assert math.isclose(float(cos[0, 0, 2, 3]), math.cos(0.5), rel_tol=1e-6)
    assert torch.equal(cos[0, 0, 0], torch.ones(4))


def test_apply_rotary_is_a_rotation_of_each_pair():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, 8, generator=g)
    cos, sin = rotary_cos_sin(torch.arange(5).expand(2, 5), 8, 10000.0)
    y = apply_rotary(x, cos, sin)
    assert y.shape == x.shape
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))  # rotations keep the norm
    torch.testing.assert_close(y[:, :, 0], x[:, :, 0])  # position 0: identity


def test_partial_rotary_passes_the_tail_unchanged_and_keeps_dtype():
    x = torch.randn(1, 2, 3, 8).to(torch.bfloat16)
    cos, sin = rotary_cos_sin(torch.arange(3)[None], 4, 10000.0)
    y = apply_rotary(x, cos, sin)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y[..., 4:], x[..., 4:])
    full = apply_rotary(x[..., :4], cos, sin)
    assert torch.equal(y[..., :4], full)
    assert not torch.equal(y[..., :4], x[..., :4])
