"""One direction of an LSTM layer over a whole padded batch, for bf16 training on a CPU
with bf16 matrix units (`--precision bf16`): the encoder's recurrence.

Why not torch's own LSTM kernel under autocast: in training the reference model (256 → 256
per direction), oneDNN's bf16 LSTM primitive took ~44 ms forward and backward per direction
of a batch (profile of 10 batches), against ~39 ms for its fp32 kernel, while the products
inside it run 5-10× faster in bf16 on AMX than in fp32. Here the products are separate
oneDNN/torch calls in bf16 (fp32 accumulation) and everything else is fp32, step by step:

    a_t = W_ih x_t + b + W_hh h_{t-1}          all steps' W_ih x_t + b: one product
    i, f, o = σ(a_i), σ(a_f), σ(a_o);  g = tanh(a_g)
    c_t = f ⊙ c_{t-1} + i ⊙ g;   h_t = o ⊙ tanh(c_t)

g comes from the same σ call as the other gates: tanh(z) = 2σ(2z) − 1, with the g rows of
W_ih, W_hh and b doubled in the bf16 copies (exact), because torch's tanh on a strided
column block of the gates ran ~6× slower than σ on the whole row (not vectorised).

Backward, from the saved gates, cells and tanh(c_t), one step at a time (t = T-1 … 0):

    dh_t = ∂L/∂h_t (from the outputs) + W_hhᵀ da_{t+1}
    dc_t = f_{t+1} ⊙ dc_{t+1} + dh_t ⊙ o ⊙ (1 − tanh²(c_t))
    da_i = dc_t ⊙ g ⊙ i(1−i)      da_f = dc_t ⊙ c_{t-1} ⊙ f(1−f)
    da_g = dc_t ⊙ i ⊙ (1−g²)      da_o = dh_t ⊙ tanh(c_t) ⊙ o(1−o)

then dW_ih = Σ_t da_tᵀ x_t, dW_hh = Σ_t da_tᵀ h_{t-1} and dx_t = W_ihᵀ da_t as three
products over all steps' rows; db = Σ_t da_t is summed step by step in fp32. The per-step
work stays on (batch, 4·hidden) blocks that fit in the caches: in a first version, each
elementwise pass over whole (steps, batch, hidden) tensors took 0.5-1 ms on 2 cores
(memory-bound), against ~5-10 µs for one step's block.

Padding is held inert as in `rnmt.nn.rnn.RNN._dense_lstm_forward`: at a padded position
the input and forget pre-activations are set to ∓SATURATE, so i = 0 and f = 1 exactly,
c_t = c_{t-1} bit for bit, and no gradient reaches the gates there (σ' = 0).
"""

from __future__ import annotations

import torch
from torch import Tensor

from rnmt.nn.onednn import onednn_linear, reorder_weight
from rnmt.precision import cpu_autocast_off

# A gate pre-activation where σ is exactly 0 or 1 in fp32, bf16 and fp16 (σ(16) rounds to 1
# in fp32 already): this layer and `RNN._dense_lstm_forward` hold the LSTM state still with it.
SATURATE = 1e4


def lstm_layer_bf16(x: Tensor, padded: Tensor, state: tuple[Tensor, Tensor],
                    w_ih: Tensor, w_hh: Tensor, b_ih: Tensor, b_hh: Tensor
                    ) -> tuple[Tensor, Tensor]:
    """One direction over a padded batch, its products in bf16 (module docstring).

    Shapes: x (batch, steps, input), padding after each row's real positions; padded
    (batch, steps) bool, True at padding; state (h0, c0), each (batch, hidden); weights in
    torch's layout and gate order (i, f, g, o). Returns the outputs h_t (batch, steps,
    hidden) in bf16 and the last cell state c_T (batch, hidden) in fp32, which at padded
    rows is the c of their last real position. Autograd to x, the state and the weights.
    """
    with cpu_autocast_off():
        out, c = _LSTMLayer.apply(x.transpose(0, 1), padded.t(), state[0], state[1],
                                  w_ih, w_hh, b_ih + b_hh)
    return out.transpose(0, 1), c


def double_g_rows(weight: Tensor) -> Tensor:
    """An LSTM weight or bias (4 * hidden, ...) in torch's gate order (i, f, g, o) with its
    g rows times 2, for g = tanh(a_g) = 2σ(2 a_g) − 1 from the σ of all gates at once."""
    rows = weight.size(0) // 4
    scale = weight.new_ones(weight.size(0), *([1] * (weight.dim() - 1)))
    scale[2 * rows : 3 * rows] = 2.0
    return weight * scale


def lstm_cell_forward(a: Tensor, c_prev: Tensor, c_out: Tensor | None = None,
                      tanh_out: Tensor | None = None, h_out: Tensor | None = None
                      ) -> tuple[Tensor, Tensor, Tensor]:
    """One step's gates and state from its pre-activations a (rows, 4·hidden), fp32, in
    torch's gate order with the g block doubled (`double_g_rows`): a becomes the gates
    (i, f, g, o) in place, g = 2σ(2a_g) − 1 = tanh(a_g). Returns h_t, c_t and tanh(c_t),
    written into the given `*_out` tensors where there are any."""
    i, f, g, o = a.sigmoid_().chunk(4, dim=1)
    g.mul_(2.0).sub_(1.0)
    c = torch.mul(f, c_prev, out=c_out).addcmul_(i, g)
    tanh_c = torch.tanh(c, out=tanh_out)
    return torch.mul(o, tanh_c, out=h_out), c, tanh_c


def lstm_gate_gradients(gates: Tensor, c_prev: Tensor, tanh_c: Tensor, dh: Tensor,
                        dc: Tensor, out: Tensor) -> Tensor:
    """One step's ∂L/∂a (rows, 4·hidden) into `out`, from the gates (i, f, g, o) and c_{t-1},
    tanh(c_t) of `lstm_cell_forward`, dh = ∂L/∂h_t, and dc = ∂L/∂c_t through the later
    steps (f_{t+1} ⊙ dc_{t+1}, or the final state's gradient), to which dh's share
    dh ⊙ o ⊙ (1 − tanh²(c_t)) is added in place (the module docstring's equations)."""
    hidden = gates.size(1) // 4
    i, f, g, o = gates.chunk(4, dim=1)
    dc.addcmul_(dh, torch.addcmul(o, o, tanh_c * tanh_c, value=-1.0))
    # s(1 − s) for the σ gates; the g block is then overwritten with i(1 − g²)
    torch.addcmul(gates, gates, gates, value=-1.0, out=out)
    torch.addcmul(i, i * g, g, value=-1.0, out=out[:, 2 * hidden : 3 * hidden])
    out[:, :hidden].mul_(g)
    out[:, hidden : 2 * hidden].mul_(c_prev)
    out[:, 3 * hidden :].mul_(tanh_c).mul_(dh)
    out.view(-1, 4, hidden)[:, :3].mul_(dc.unsqueeze(1))
    return out


class _LSTMLayer(torch.autograd.Function):
    """Time-major: x (steps, batch, input), padded (steps, batch), h0 and c0 (batch,
    hidden), bias = b_ih + b_hh -> outputs (steps, batch, hidden) bf16, c_T fp32."""

    @staticmethod
    def forward(ctx, x: Tensor, padded: Tensor, h0: Tensor, c0: Tensor,  # type: ignore[override]
                w_ih: Tensor, w_hh: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
        bf16 = torch.bfloat16
        steps, batch, _ = x.shape
        hidden = w_hh.size(1)
        inputs = x.to(bf16, memory_format=torch.contiguous_format).view(steps * batch, -1)
        w_ih16, w_hh16 = w_ih.detach().to(bf16), w_hh.detach().to(bf16)
        pre = onednn_linear(inputs, reorder_weight(double_g_rows(w_ih16)),
                            double_g_rows(bias.detach().float()))
        pre = pre.view(steps, batch, 4 * hidden)
        pre[..., :hidden].masked_fill_(padded.unsqueeze(-1), -SATURATE)
        pre[..., hidden : 2 * hidden].masked_fill_(padded.unsqueeze(-1), SATURATE)
        recurrent = reorder_weight(double_g_rows(w_hh16))

        gates = x.new_empty((steps, batch, 4 * hidden), dtype=torch.float32)
        cells = gates.new_empty((steps + 1, batch, hidden))
        tanh_cells = gates.new_empty((steps, batch, hidden))
        hs = gates.new_empty((steps + 1, batch, hidden), dtype=bf16)  # h_0 … h_T
        cells[0].copy_(c0)
        hs[0].copy_(h0)
        for t in range(steps):
            # Copied, then added in fp32: a bf16 + bf16 sum would round (and copy) as well.
            a = gates[t].copy_(pre[t]).add_(onednn_linear(hs[t], recurrent, None))
            lstm_cell_forward(a, cells[t], cells[t + 1], tanh_cells[t], hs[t + 1])
        ctx.save_for_backward(inputs, w_ih16, w_hh16, gates, cells, tanh_cells, hs)
        ctx.input_dtype = x.dtype
        return hs[1:], cells[steps].clone()

    @staticmethod
    def backward(ctx, grad_out: Tensor, grad_c: Tensor  # type: ignore[override]
                 ) -> tuple[Tensor, None, Tensor, Tensor, Tensor, Tensor, Tensor]:
        inputs, w_ih16, w_hh16, gates, cells, tanh_cells, hs = ctx.saved_tensors
        steps, batch, four_hidden = gates.shape
        hidden = four_hidden // 4
        dh_all = grad_out.to(torch.float32, memory_format=torch.contiguous_format)
        dc = grad_c.float().clone()
        da = gates.new_empty((batch, four_hidden))  # one step's ∂L/∂a, fp32
        da_all = gates.new_empty((steps, batch, four_hidden), dtype=torch.bfloat16)
        grad_bias, ones = gates.new_zeros(four_hidden), gates.new_ones(batch)
        for t in range(steps - 1, -1, -1):
            dh = dh_all[t]
            if t < steps - 1:
                dh.add_(da_all[t + 1] @ w_hh16)
                dc.mul_(gates[t + 1, :, hidden : 2 * hidden])
            lstm_gate_gradients(gates[t], cells[t], tanh_cells[t], dh, dc, da)
            da_all[t].copy_(da)
            grad_bias.addmv_(da.t(), ones)  # in fp32, while da is in the caches
        flat = da_all.view(steps * batch, four_hidden)
        grad_h0 = (da_all[0] @ w_hh16).float()
        grad_c0 = dc.mul_(gates[0, :, hidden : 2 * hidden])
        grad_w_hh = (flat.t() @ hs[:-1].reshape(steps * batch, hidden)).float()
        grad_w_ih = (flat.t() @ inputs).float()
        grad_x = (flat @ w_ih16).view(steps, batch, -1).to(ctx.input_dtype)
        return grad_x, None, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_bias
