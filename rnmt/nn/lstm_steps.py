"""The first layer of a teacher-forced LSTM decoder, one step at a time, for CPU training:
the recurrence `rnmt.nn.rnn.Stepper` runs when the decoder's input at step t is only
known at step t (Bahdanau's context vector, Luong's input feeding).

    a_t = pre_t + W [x_t; h_{t-1}]           pre_t = W_e e_t + b, all steps at once
    i, f, o = σ(a_i), σ(a_f), σ(a_o);  g = tanh(a_g)
    c_t = f ⊙ c_{t-1} + i ⊙ g;   h_t = o ⊙ tanh(c_t)

W = [W_ih[:, d:]  W_hh] (4·hidden, rest + hidden) multiplies the step's context x_t and the
previous state; the embeddings' share pre_t comes from one large product over all steps.

What one pass (`LSTMSteps`, built per forward pass) shares between its steps:

- the steps' [x_t; h_{t-1}] are copied straight into one (steps · rows, rest + hidden)
  buffer, which the forward products read row block by row block and the weight's
  gradient dW = Σ_t da_tᵀ [x_t; h_{t-1}] reads whole (one product over all steps' rows);
- each step's backward writes its gate gradient da_t into one (steps, rows, 4·hidden)
  buffer, which is at once the gradient of all steps' pre_t and the other operand of dW.

Through autograd's own ops (and `rnmt.nn.onednn.RecurrentProduct` for the product), every
step concatenated [x_t; h_{t-1}], split the gates' and the concatenation's gradients, and
at the end the steps' inputs, their gate gradients and pre_t's gradient were each
concatenated again: ~10 ms of a ~550 ms fp32 reference-model batch (profile of 20
batches). This pass ran 1.016× the speed of that one in fp32 and 1.027× in bf16 (in one
process, alternating, over 60 training batches). The gates and their gradients are
the encoder's bf16 layer's (`rnmt.nn.lstm_layer.lstm_cell_forward` and
`lstm_gate_gradients`), g from the same σ call as the other gates (tanh(z) = 2σ(2z) − 1,
the g rows of the forward product's weight copy doubled):

    dc_t = f_{t+1} ⊙ dc_{t+1} + dh_t ⊙ o ⊙ (1 − tanh²(c_t))
    da_i = dc_t ⊙ g ⊙ i(1−i)      da_f = dc_t ⊙ c_{t-1} ⊙ f(1−f)
    da_g = dc_t ⊙ i ⊙ (1−g²)      da_o = dh_t ⊙ tanh(c_t) ⊙ o(1−o)
    [dx_t; dh_{t-1}] = da_t W

Products in fp32, or in bf16 under `--precision bf16` (`recurrent_product_dtype`): then the
buffers hold bf16 copies, padded with zero rows to the sizes `training_rows` picks (oneDNN
builds a kernel per shape), and everything elementwise stays fp32.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rnmt.nn.lstm_layer import double_g_rows, lstm_cell_forward, lstm_gate_gradients
from rnmt.nn.onednn import onednn_linear, reorder_weight, training_rows
from rnmt.precision import cpu_autocast_off


class LSTMSteps:
    """One teacher-forced pass of an LSTM layer over `steps` steps of `rows` rows.

    Shapes: pre (steps, rows, 4·hidden) fp32, W_e e_t + b_ih + b_hh for every step; weight
    (4·hidden, rest + hidden) = [W_ih[:, d:]  W_hh] in torch's gate order (i, f, g, o);
    a step takes x_t (rows, rest), h_{t-1} and c_{t-1} (rows, hidden), all fp32, and
    returns h_t and c_t. Steps run in order 0, 1, …, one backward per forward pass.
    """

    def __init__(self, weight: Tensor, pre: Tensor, dtype: torch.dtype) -> None:
        self._shared = _Pass(weight, pre, dtype)
        with cpu_autocast_off():
            self._token = _PassGradient.apply(weight, pre, self._shared)

    def step(self, t: int, x: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        with cpu_autocast_off():
            return _Step.apply(x, h, c, self._token, self._shared, t)


class _Pass:
    """The pass's weight (as it is, for the backward products, and reordered with its g
    rows doubled, for the forward ones), pre, the inputs' and the gate gradients' buffers,
    and the last step backward reached."""

    def __init__(self, weight: Tensor, pre: Tensor, dtype: torch.dtype) -> None:
        steps, rows, four_hidden = pre.shape
        self.dtype = dtype
        self.weight_dtype = weight.dtype
        self.weight = weight.detach().to(dtype)
        self.packed = reorder_weight(double_g_rows(self.weight))
        self.pre = pre.detach()
        self.g_scale = double_g_rows(pre.new_ones(four_hidden))
        # bf16: every step's block padded to `training_rows`, and the whole to that of the
        # total, the padding zero (it adds nothing to dW). fp32 runs unpadded.
        self.block = training_rows(rows) if dtype == torch.bfloat16 else rows
        total = steps * self.block
        flat_rows = training_rows(total) if dtype == torch.bfloat16 else total
        self.inputs = pre.new_empty((flat_rows, weight.size(1)), dtype=dtype)
        self.grads = pre.new_empty((steps, rows, four_hidden))  # da_t, fp32
        self.grads16: Tensor | None = None  # bf16: their copies, zero where never written
        if dtype != torch.float32:
            self.grads16 = pre.new_zeros((flat_rows, four_hidden), dtype=dtype)
        if flat_rows > rows * steps:  # zero padding rows, once
            blocks = self.inputs[:total].view(steps, self.block, -1)
            blocks[:, rows:].zero_()
            self.inputs[total:].zero_()
        self.last_reached = -1

    def block_of(self, buffer: Tensor, t: int) -> Tensor:
        """Step t's (block, cols) rows of a flat buffer."""
        return buffer[t * self.block : (t + 1) * self.block]


class _PassGradient(torch.autograd.Function):
    """The weight's and pre's one node in the graph: forward hands out a scalar every step
    takes as an input, so autograd runs this backward after all the steps' backwards; it
    returns dW = Σ_t da_tᵀ [x_t; h_{t-1}] and ∂L/∂pre = (da_t)_t."""

    @staticmethod
    def forward(ctx, weight: Tensor, pre: Tensor, shared: _Pass) -> Tensor:  # type: ignore[override]
        ctx.shared = shared
        return weight.new_zeros(())

    @staticmethod
    def backward(ctx, _: Tensor) -> tuple[Tensor, Tensor, None]:  # type: ignore[override]
        shared: _Pass = ctx.shared
        # Backward reaches steps 0 … k, k < T-1 when the last steps' outputs went unused.
        shared.grads[shared.last_reached + 1 :].zero_()
        grads = shared.grads
        operand = grads.view(-1, grads.size(-1)) if shared.grads16 is None else shared.grads16
        grad_weight = (operand.t() @ shared.inputs).to(shared.weight_dtype)
        shared.inputs = shared.grads = shared.grads16 = None  # type: ignore[assignment]
        return grad_weight, grads, None


class _Step(torch.autograd.Function):
    """Step t: x_t (rows, rest), h_{t-1}, c_{t-1} (rows, hidden) -> h_t, c_t (module
    docstring). Saves the gates (i, f, g, o), c_{t-1} and tanh(c_t)."""

    @staticmethod
    def forward(ctx, x: Tensor, h: Tensor, c: Tensor, token: Tensor,  # type: ignore[override]
                shared: _Pass, t: int) -> tuple[Tensor, Tensor]:
        rows, rest = x.shape
        operand = shared.block_of(shared.inputs, t)
        operand[:rows, :rest].copy_(x)
        operand[:rows, rest:].copy_(h)
        product = onednn_linear(operand, shared.packed)
        if shared.dtype == torch.float32:  # rows == block: the product is the gates' tensor
            gates = product.addcmul_(shared.pre[t], shared.g_scale)
        else:
            gates = torch.mul(shared.pre[t], shared.g_scale).add_(product[:rows])
        h_new, c_new, tanh_c = lstm_cell_forward(gates, c)
        ctx.save_for_backward(gates, c, tanh_c)
        ctx.shared, ctx.t = shared, t
        ctx.set_materialize_grads(False)
        return h_new, c_new

    @staticmethod
    def backward(ctx, grad_h: Tensor | None, grad_c: Tensor | None):  # type: ignore[override]
        gates, c, tanh_c = ctx.saved_tensors
        shared: _Pass = ctx.shared
        t = ctx.t
        shared.last_reached = max(shared.last_reached, t)
        rows, hidden = tanh_c.shape
        if grad_h is None:  # h_t reached the loss only through c_t's successors
            grad_h = torch.zeros_like(tanh_c)
        dc = torch.zeros_like(tanh_c) if grad_c is None else grad_c.clone()
        da = lstm_gate_gradients(gates, c, tanh_c, grad_h, dc, shared.grads[t])
        if shared.grads16 is None:
            grad_xh = da @ shared.weight
        else:
            operand = shared.block_of(shared.grads16, t)
            operand[:rows].copy_(da)
            grad_xh = (operand @ shared.weight)[:rows].float()
        rest = grad_xh.size(1) - hidden
        f = gates[:, hidden : 2 * hidden]
        return grad_xh[:, :rest], grad_xh[:, rest:], dc.mul_(f), torch.zeros(()), None, None
