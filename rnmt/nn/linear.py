"""y = x Wᵀ + b, the models' affine maps, with a CPU bf16 training path.

Under `--precision bf16` on a CPU with bf16 matrix units (`cpu_training_products`),
autocast would run these products on oneDNN in bf16 at whatever row count the batch has,
and oneDNN builds a kernel for every new shape (`rnmt.nn.onednn.pad_rows`). `linear` runs
them at `training_rows` rows instead: x and W rounded to bf16, fp32 accumulation, and the
result, the bias and the gradients handed back in fp32. Everywhere else it is `F.linear`
(autocast included: on a GPU, or in fp16).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rnmt.nn.onednn import biased_product, pad_rows
from rnmt.precision import cpu_autocast_off, cpu_training_products


class _PaddedLinear(torch.autograd.Function):
    """x (..., in) -> (..., out) in fp32, the products in `dtype` at padded row counts:
    forward x Wᵀ, backward dx = dy W and dW = dyᵀ x (the padded rows add nothing)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None,  # type: ignore[override]
                dtype: torch.dtype) -> Tensor:
        flat = x.reshape(-1, x.size(-1))
        operand, w = pad_rows(flat, dtype), weight.to(dtype)
        y = biased_product(operand, w, bias)[: flat.size(0)]
        # Written into a tensor of the output's shape: a view returned from here could not
        # be modified in place (`Attention.keys` doubles its keys so).
        out = flat.new_empty((*x.shape[:-1], weight.size(0)), dtype=torch.float32)
        out.view_as(y).copy_(y)
        ctx.save_for_backward(operand, w)
        ctx.shape, ctx.has_bias = x.shape, bias is not None
        ctx.dtypes = (x.dtype, weight.dtype)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        operand, w = ctx.saved_tensors
        flat = grad.reshape(-1, grad.size(-1))
        rows = flat.size(0)
        grad_operand = pad_rows(flat, w.dtype)
        grad_x = (grad_operand @ w)[:rows].to(ctx.dtypes[0]).view(ctx.shape)
        grad_weight = (grad_operand.t() @ operand).to(ctx.dtypes[1])
        grad_bias = flat.sum(0) if ctx.has_bias else None
        return grad_x, grad_weight, grad_bias, None


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """`F.linear(x, weight, bias)`; in bf16 CPU training, its products in bf16 at padded
    row counts and its result in fp32 (module docstring)."""
    if cpu_training_products(x) == torch.bfloat16:
        with cpu_autocast_off():
            return _PaddedLinear.apply(x, weight, bias, torch.bfloat16)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """`nn.Linear` (same parameters, same state dict) through `linear`."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)
