"""Matrix products through oneDNN, in fp32 (or bf16 on a CPU with bf16 matrix units), with
the weight reordered once into oneDNN's blocked layout, for the products a recurrence
repeats at every step.

torch's fp32 `addmm` (MKL) runs products of a few dozen to a few hundred rows on one core;
oneDNN spreads them over the threads. Measured on the development machine (AMD EPYC,
AVX2, 2 threads, torch 2.13 CPU), ms per product:

    (rows × 1280) @ (1280 × 2048)     5     40     64    160    320    500 rows
    addmm                           1.20   4.20   5.99   9.84  15.16  27.38
    oneDNN                          0.41   2.16   3.37   7.04  14.02  21.20

- `OneDNNLinear`: inference (`rnmt.step_layers` swaps it into a loaded model).
- `RecurrentProduct`: training, for a weight multiplied at every step of a teacher-forced
  recurrence (the attention's query projection, `rnmt.nn.attention.AttentionSteps`; the
  decoder's gate product has its own pass with the gates, `rnmt.nn.lstm_steps`).

The ops (`mkldnn._reorder_linear_weight`, `mkldnn._linear_pointwise`) are the ones
torch.compile's CPU backend packs weights with; a torch build without them, or without
oneDNN, does without (`onednn_available`).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from rnmt.precision import cpu_autocast_off, cpu_training_products


def row_bucket(rows: int) -> int:
    """The row count a product of `rows` rows runs at: the next multiple of 8 up to 64,
    then of a quarter of the power of two below (80, 96, 112, 128, 160, …, 256, 320, …).

    A beam search's row count falls one sentence at a time. Run at every count, oneDNN
    builds a kernel per count, and the inputs, outputs and buffers of hundreds of sizes
    leave the heap fragmented: the reference model's four step layers, run at every count
    from 1 to 320, grew the resident set by 800 MB, against 58 MB at these 17 sizes (and
    43 MB for torch's addmm) and ran 1.3× slower (`benchmarks/step_layers_memory.py`). At
    most 7 padding rows up to 64 rows, at most 25 % more above; 3.4 % more over a beam-5
    search of Multi30k test_2016, and none at full batch and beam (64 × 5 = 320 is a
    size)."""
    if rows <= 64:
        return max(8, -(-rows // 8) * 8)
    step = 1 << (rows - 1).bit_length() - 3
    return -(-rows // step) * step


def onednn_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x Wᵀ (+ b) for x (rows, in) and W (out, in), reordered by `reorder_weight` or as it is
    (oneDNN then reorders it for the call), in x's dtype; an fp32 bias is added to the
    fp32 sums before they are rounded to that dtype."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def biased_product(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """x Wᵀ + b for operands x (rows, in) and W (out, in) already in the product dtype and
    an fp32 bias (or None). On oneDNN the bias joins the fp32 sums and the result comes in
    x's dtype, so a caller's copy into fp32 is one conversion pass: adding the bias to a
    bf16 result across dtypes afterwards took about twice as long (12 ms a batch for the
    reference model's vocabulary layer). Elsewhere the plain product, the bias added after
    (in fp32)."""
    if onednn_runs(x.dtype):
        return onednn_linear(x, weight, bias)
    y = x @ weight.t()
    return y if bias is None else torch.add(bias, y)


def reorder_weight(weight: Tensor) -> Tensor:
    """W (out, in) in oneDNN's blocked layout. The row-count hint (None) only tunes the
    blocking; any number of rows runs."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), None)


class OneDNNLinear(nn.Module):
    """y = x Wᵀ + b through oneDNN, the weight reordered once at construction.
    Shapes: x (..., in_features) -> (..., out_features), fp32 in and out. Inference only
    (no autograd). Inputs run padded to `row_bucket` rows.

    `dtype` is what the product multiplies in: fp32, or bf16 (`--precision bf16` on a CPU
    with AMX / AVX512-BF16): the weight is stored in bf16, x is rounded to bf16 on the way
    in, oneDNN accumulates in fp32, adds the fp32 bias and rounds the result to bf16, which
    comes back as fp32. Only the product is bf16: what surrounds it (gates, attention,
    softmax, the recurrent state) stays fp32.
    """

    def __init__(self, weight: Tensor, bias: Tensor | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.dtype = dtype
        self._packed = reorder_weight(weight.detach().cpu().to(dtype))
        self._bias = None if bias is None else bias.detach().float().cpu().contiguous()

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, self.in_features)
        rows, size = flat.size(0), row_bucket(flat.size(0))
        # Full batches (64 × beam 5 = 320 rows) are a size already: no padding, and in fp32
        # no copy. Else one copy casts and pads at once; rows are independent, so the zero
        # rows only fill the kernel's shape.
        flat = (flat.to(self.dtype).contiguous() if size == rows
                else pad_rows(flat, self.dtype, size))
        y = onednn_linear(flat, self._packed, self._bias)
        return y[:rows].float().view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        precision = "" if self.dtype == torch.float32 else f" {self.dtype}"
        return f"in_features={self.in_features}, out_features={self.out_features}, oneDNN{precision}"


@functools.cache
def onednn_available() -> bool:
    """Whether this torch build runs `OneDNNLinear` (and gets its answer right)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        # Fixed numbers, not torch.randn: the first call can come in the middle of training,
        # and a draw from the global generator there would shift the dropout stream.
        weight, x = torch.linspace(-1, 1, 32).view(8, 4), torch.linspace(-2, 2, 12).view(3, 4)
        # The first call can come under autocast too (`--precision bf16`), which would
        # round the fp32 reference product to bf16.
        with cpu_autocast_off():
            return torch.allclose(OneDNNLinear(weight)(x), x @ weight.t(), atol=1e-5)
    except (AttributeError, RuntimeError):  # ops missing from this build or refused
        return False


def onednn_runs(dtype: torch.dtype) -> bool:
    """Whether oneDNN products in `dtype` run here: oneDNN switched on
    (`torch.backends.mkldnn.enabled`), `onednn_available`, and for bf16 its bf16 kernels
    (AVX512-BF16 or AMX; elsewhere they are refused or emulated)."""
    if not torch.backends.mkldnn.enabled or not onednn_available():
        return False
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return dtype == torch.float32


def training_rows(rows: int) -> int:
    """The row count a bf16 training product of `rows` rows runs at (`pad_rows`): the next
    multiple of 2^(⌊log2 rows⌋ − 3), at least 8: eight sizes per octave, at most 1/8
    padding (72 for 66 rows, 160 for 157, 3072 for 2996)."""
    step = max(8, 1 << max(0, rows.bit_length() - 4))
    return -(-rows // step) * step


def pad_rows(x: Tensor, dtype: torch.dtype, size: int | None = None) -> Tensor:
    """x (rows, cols) in `dtype`, with zero rows appended up to `size` rows
    (`training_rows(rows)` by default): one copy, the cast included.

    Why: oneDNN builds a kernel for every shape of bf16 product it meets, ~10 ms for the
    reference model's vocabulary product on the AMX development machine, while training
    batches hardly ever repeat a row count (sentences × pieces): on 6 batches, their bf16
    training steps ran 4,569 target tokens/s the first time and 5,656 the second. Zero rows
    change no row of a product, and add nothing to a sum over rows."""
    rows = x.size(0)
    size = training_rows(rows) if size is None else size
    out = x.new_empty((size, *x.shape[1:]), dtype=dtype)
    out[:rows].copy_(x)
    out[rows:].zero_()
    return out


class _Pass:
    """What the steps of one forward/backward pass share: W in the product dtype, as it is
    (for the backward products) and reordered (for the forward ones), and every step's
    (x_t, dy_t), in the product dtype (bf16: padded by `pad_rows`), until the weight's
    gradient is formed."""

    def __init__(self, weight: Tensor, dtype: torch.dtype) -> None:
        self.dtype, self.weight_dtype = dtype, weight.dtype
        self.pad = dtype == torch.bfloat16  # fp32 runs unpadded: its kernels build fast
        self.weight = weight.detach().to(dtype)
        self.packed = reorder_weight(self.weight)
        self.inputs: list[Tensor] = []
        self.grads: list[Tensor] = []  # in backward order: last step first


class _WeightGradient(torch.autograd.Function):
    """The weight's single node in the graph: forward hands out a scalar that every step
    takes as an input, so autograd runs this backward after all the steps' backwards, when
    it forms dW = Σ_t dy_tᵀ x_t as one product over all steps' rows."""

    @staticmethod
    def forward(ctx, weight: Tensor, shared: _Pass) -> Tensor:  # type: ignore[override]
        ctx.shared = shared
        return weight.new_zeros(())

    @staticmethod
    def backward(ctx, _: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        shared: _Pass = ctx.shared
        grads = shared.grads[::-1]  # forward order, to pair with the inputs
        inputs = shared.inputs[: len(grads)]  # the steps backward reached (all, usually)
        shared.grads, shared.inputs = [], []
        if shared.pad:  # zero rows up to `training_rows`, in the one concatenation
            grads, inputs = _with_zero_rows(grads), _with_zero_rows(inputs)
        return (torch.cat(grads).t() @ torch.cat(inputs)).to(shared.weight_dtype), None


class _StepProduct(torch.autograd.Function):
    """y_t = x_t Wᵀ; backward dx_t = dy_t W, and dy_t kept for `_WeightGradient`.
    x_t and dy_t are rounded to the product dtype, y_t and dx_t come back in x_t's."""

    @staticmethod
    def forward(ctx, x: Tensor, token: Tensor, shared: _Pass) -> Tensor:  # type: ignore[override]
        ctx.shared = shared
        operand = _operand(x, shared)
        shared.inputs.append(operand)
        return onednn_linear(operand, shared.packed)[: x.size(0)].to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, None]:  # type: ignore[override]
        shared: _Pass = ctx.shared
        operand = _operand(grad, shared)
        shared.grads.append(operand)
        dx = (operand @ shared.weight)[: grad.size(0)].to(grad.dtype)  # W as it is
        return dx, grad.new_zeros(()), None


def _with_zero_rows(parts: list[Tensor]) -> list[Tensor]:
    """parts (rows_i, cols) and a block of zero rows that pads Σ rows_i to `training_rows`."""
    rows = sum(part.size(0) for part in parts)
    extra = training_rows(rows) - rows
    return parts + [parts[0].new_zeros(extra, parts[0].size(1))] if extra else parts


def _operand(x: Tensor, shared: _Pass) -> Tensor:
    """x as the pass's products take it: in their dtype, padded where that is bf16."""
    return pad_rows(x, shared.dtype) if shared.pad else x.contiguous()


def recurrent_product_dtype(x: Tensor) -> torch.dtype | None:
    """The dtype a `RecurrentProduct` in a training pass over x multiplies in
    (`cpu_training_products`), or None where it cannot run (no oneDNN, switched off, no
    bf16 kernels)."""
    dtype = cpu_training_products(x)
    return dtype if dtype is not None and onednn_runs(dtype) else None


class RecurrentProduct:
    """x_t Wᵀ at every step t of one teacher-forced pass, W (out, in) fixed for the pass
    (build one per forward pass: the optimizer changes W between passes). Shapes: x_t
    (rows, in) -> (rows, out), the same rows at every step.

    - forward: oneDNN, W reordered once per pass;
    - backward of each step: dx_t = dy_t W, a plain product with W as it is. A reordered
      Wᵀ made each step's product a little faster, but its transposed copy and reorder
      took ~11 ms a batch in fp32 for the decoder's (2048, 1024) weight, more than the
      steps saved: without it, in one process over 60 pairs of reference-model training
      batches, 1.014× and 1.020× the speed in fp32, 1.008× and 1.014× in bf16 (Xeon with
      AMX; on an AVX2 CPU, whose fp32 MKL products ran slower than oneDNN's in the table
      above, fp32 may lose instead: not measured there);
    - the weight's gradient dW = Σ_t dy_tᵀ x_t: one product whose inner size is all steps'
      rows, instead of one per step of inner size `rows` plus a running sum. On the
      reference model (71 rows, 1024 -> 2048) the per-step products ran at ~50 GFLOP/s,
      the single one at ~115.

    `dtype` is what the products multiply in: W's own, or bf16 (`--precision bf16` on a
    CPU with AMX / AVX512-BF16): W, x_t and dy_t are rounded to bf16, oneDNN accumulates in
    fp32, and y_t, dx_t and dW come back in fp32 (rounded to bf16 on the way).

    First-order gradients, one backward per forward pass (what training does). The steps'
    inputs and output gradients are held until the weight's gradient is formed: about
    the size of the gate activations autograd keeps anyway (half of it in bf16).
    """

    def __init__(self, weight: Tensor, dtype: torch.dtype | None = None) -> None:
        self._shared = _Pass(weight, weight.dtype if dtype is None else dtype)
        self._token = _WeightGradient.apply(weight, self._shared)

    def __call__(self, x: Tensor) -> Tensor:
        return _StepProduct.apply(x.contiguous(), self._token, self._shared)
