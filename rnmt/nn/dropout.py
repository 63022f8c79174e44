"""Dropout (Srivastava et al. 2014) with a cheaper random mask on the CPU.

In training each element is zeroed with probability p and the survivors are scaled by
1 / (1 - p), so the expected output equals the input; in evaluation dropout is the identity.

torch's CPU dropout draws one random number per element (`bernoulli_`), and on the
development machine (AMD EPYC, 2 threads) that was 3-4 % of a training step of the reference
model: four masks per batch of ~1.5 M elements each, ~15 ms apiece. Here one 32-bit draw
gives two 16-bit uniform numbers u, and an element survives when u ≥ d with
d = round(p · 2¹⁶): the drop probability is d / 2¹⁶ (p rounded to a multiple of 2⁻¹⁶,
0.199997 for 0.2) and the survivors are scaled by 2¹⁶ / (2¹⁶ - d), so the expectation is
still exact. The mask is kept as one byte per element. On a GPU, and for p = 0 or 1, this
is `torch.nn.functional.dropout`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LEVELS = 1 << 16  # the resolution of one uniform draw: 16 bits


def dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """x with each element zeroed with probability p (rounded to a multiple of 2⁻¹⁶ on the
    CPU) and the rest scaled to keep the expectation; x itself when not training."""
    if not training or p == 0.0:
        return x
    drop = round(p * LEVELS)
    if x.device.type != "cpu" or not x.is_floating_point() or not 0 < drop < LEVELS:
        return F.dropout(x, p, training=True)
    n = x.numel()
    # Two uniform 16-bit numbers per 32-bit draw, read as int16: u ≥ d ⟺ int16 ≥ d - 2¹⁵.
    draws = torch.empty((n + 1) // 2, dtype=torch.int32).random_(-(1 << 31), 1 << 31)
    keep = (draws.view(torch.int16)[:n] >= drop - LEVELS // 2).view(x.shape)
    return _MaskedScale.apply(x, keep, LEVELS / (LEVELS - drop))


class _MaskedScale(torch.autograd.Function):
    """y = x ⊙ keep · scale, and ∂L/∂x = ∂L/∂y ⊙ keep · scale; keep is bool."""

    @staticmethod
    def forward(ctx, x: Tensor, keep: Tensor, scale: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(keep)
        ctx.scale = scale
        # The op of torch's own dropout backward: one pass, x ⊙ keep · scale.
        return torch.ops.aten.native_dropout_backward(x, keep, scale)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        (keep,) = ctx.saved_tensors
        return torch.ops.aten.native_dropout_backward(grad, keep, ctx.scale), None, None


class Dropout(nn.Module):
    """`dropout` as a module, active in training mode: a drop-in for `torch.nn.Dropout`
    (no parameters, so checkpoints are unchanged)."""

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probability must be in [0, 1], got {p}")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"
