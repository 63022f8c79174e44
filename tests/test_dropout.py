"""Dropout's CPU mask: the drop rate, the scale, the gradient, and the random stream."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from rnmt.nn.dropout import LEVELS, Dropout, dropout


@pytest.mark.parametrize("p", [0.2, 0.5, 0.9])
def test_drop_rate_and_scale_keep_the_expectation(p):
    """p rounded to a multiple of 2⁻¹⁶; survivors scaled so that E[y] = x exactly. All four
    16-bit lanes of every 64-bit random word are used (each lane on its own has the rate)."""
    torch.manual_seed(0)
    n = 1 << 20
    y = dropout(torch.ones(n), p, training=True)
    drop = round(p * LEVELS) / LEVELS
    values = torch.unique(y).tolist()
    assert values[0] == 0.0 and values[1:] == [pytest.approx(1 / (1 - drop))]
    sigma = math.sqrt(drop * (1 - drop) / (n // 4))
    for lane in range(4):
        assert abs((y[lane::4] == 0).double().mean().item() - drop) < 5 * sigma


def test_the_gradient_goes_through_the_same_mask():
    torch.manual_seed(1)
    x = torch.randn(7, 33, requires_grad=True)  # an odd element count: half a draw unused
    y = dropout(x, 0.3, training=True)
    g = torch.randn_like(y)
    (grad,) = torch.autograd.grad((y * g).sum(), x)
    kept = y != 0
    scale = LEVELS / (LEVELS - round(0.3 * LEVELS))
    torch.testing.assert_close(y, torch.where(kept, x * scale, 0.0))
    torch.testing.assert_close(grad, torch.where(kept, g * scale, 0.0))


def test_evaluation_and_zero_rate_leave_the_input_alone():
    x = torch.randn(4, 5)
    assert dropout(x, 0.5, training=False) is x
    assert dropout(x, 0.0, training=True) is x
    module = Dropout(0.5).eval()
    assert module(x) is x
    assert torch.equal(Dropout(1.0).train()(x), torch.zeros_like(x))  # torch's own, p = 1


def test_masks_come_from_the_global_generator():
    """Same seed, same masks (training is reproducible and resumable from the RNG state),
    and a mask moves the stream on."""
    x = torch.ones(1000)
    torch.manual_seed(3)
    first, second = dropout(x, 0.2, True), dropout(x, 0.2, True)
    torch.manual_seed(3)
    assert torch.equal(dropout(x, 0.2, True), first)
    assert not torch.equal(first, second)


def test_neighbouring_masks_are_uncorrelated():
    """Consecutive masks come from generators seeded by consecutive draws of torch's: their
    drops must not line up (agreement of two independent masks: p² + (1 - p)²)."""
    torch.manual_seed(5)
    n, p = 1 << 18, 0.5
    a, b = (dropout(torch.ones(n), p, True) == 0 for _ in range(2))
    agreement = (a == b).double().mean().item()
    assert abs(agreement - 0.5) < 5 * math.sqrt(0.25 / n)


def test_integer_and_other_inputs_fall_back_to_torch():
    torch.manual_seed(4)
    x = torch.randn(100, dtype=torch.float64)
    torch.manual_seed(4)
    assert torch.equal(dropout(x, 1e-6, True), F.dropout(x, 1e-6, True))  # rounds to 0 levels
    with pytest.raises(ValueError):
        Dropout(1.5)
