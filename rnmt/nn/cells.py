"""Readable reference implementations of the three classic recurrent cells.

Each cell computes one time step, with its equations written out in the docstring and
its parameters laid out the way the equations read: one ``nn.Linear`` over the
concatenation ``[h_{t-1}; x_t]`` producing all gates, in the gate order of the docstring.
They are slow (one Python step per token) but every line maps to a line of maths, and
``load_from_torch`` copies the weights of a ``torch.nn`` cell or fused layer exactly, so
the tests can check them against torch to float64 precision.

``run_cell`` unrolls any of these cells over a padded batch the way
``torch.nn.RNN/LSTM/GRU`` read a ``pack_padded_sequence`` input.

``parameters_from_torch`` gives a cell's parameters as differentiable functions of a torch
layer's weights (no copy), which is how ``rnmt.nn.rnn.RNN(impl="reference")`` trains the
fused layer's own parameters through these readable equations.
"""

from __future__ import annotations

import math
from typing import Union

import torch
from torch import Tensor, nn

__all__ = ["RNNCell", "LSTMCell", "GRUCell", "Cell", "State", "run_cell", "parameters_from_torch"]

#: The recurrent state: ``h`` for the RNN and GRU cells, ``(h, c)`` for the LSTM cell.
State = Union[Tensor, tuple[Tensor, Tensor]]


def _reset_uniform(module: nn.Module, hidden_size: int) -> None:
    """torch's default initialisation for recurrent weights: U(-1/√hidden, 1/√hidden)."""
    bound = 1.0 / math.sqrt(hidden_size)
    for parameter in module.parameters():
        nn.init.uniform_(parameter, -bound, bound)


def _torch_weights(
    source: nn.Module,
    cell_type: type[nn.RNNCellBase],
    layer_type: type[nn.RNNBase],
    layer: int,
    reverse: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fetch ``(weight_ih, weight_hh, bias_ih, bias_hh)`` of one layer/direction of ``source``.

    ``source`` is a ``torch.nn`` cell (``cell_type``) or fused layer (``layer_type``).
    A torch module built with ``bias=False`` gives zero biases.
    """
    if isinstance(source, cell_type):
        if layer != 0 or reverse:
            raise ValueError(
                f"a {cell_type.__name__} has a single layer and direction; "
                f"got layer={layer}, reverse={reverse}"
            )
        suffix = ""
    elif isinstance(source, layer_type):
        if not 0 <= layer < source.num_layers:
            raise ValueError(
                f"layer={layer} is out of range for a {source.num_layers}-layer {layer_type.__name__}"
            )
        if reverse and not source.bidirectional:
            raise ValueError(f"reverse=True needs a bidirectional {layer_type.__name__}")
        if getattr(source, "proj_size", 0):
            raise ValueError("LSTMs with proj_size > 0 have no reference cell")
        suffix = f"_l{layer}" + ("_reverse" if reverse else "")
    else:
        raise TypeError(
            f"expected a torch.nn.{cell_type.__name__} or torch.nn.{layer_type.__name__}, "
            f"got {type(source).__name__}"
        )
    weight_ih = getattr(source, "weight_ih" + suffix)
    weight_hh = getattr(source, "weight_hh" + suffix)
    if source.bias:
        bias_ih = getattr(source, "bias_ih" + suffix)
        bias_hh = getattr(source, "bias_hh" + suffix)
    else:
        bias_ih = bias_hh = weight_ih.new_zeros(weight_ih.shape[0])
    return weight_ih, weight_hh, bias_ih, bias_hh


def _check_shapes(cell: nn.Module, gates: int, weight_ih: Tensor, weight_hh: Tensor) -> None:
    hidden, inputs = cell.hidden_size, cell.input_size
    expected_ih, expected_hh = (gates * hidden, inputs), (gates * hidden, hidden)
    if tuple(weight_ih.shape) != expected_ih or tuple(weight_hh.shape) != expected_hh:
        raise ValueError(
            f"torch weights of shapes weight_ih {tuple(weight_ih.shape)}, weight_hh "
            f"{tuple(weight_hh.shape)} do not fit a {type(cell).__name__}(input_size={inputs}, "
            f"hidden_size={hidden}), which needs {expected_ih} and {expected_hh}"
        )


def _copy_parameters(cell: nn.Module, values: dict[str, Tensor]) -> nn.Module:
    for name, value in values.items():
        cell.get_parameter(name).copy_(value)
    return cell


class RNNCell(nn.Module):
    """One step of a vanilla (Elman) recurrent cell with a tanh non-linearity.

        h_t = tanh(W [h_{t-1}; x_t] + b)

    Parameters: ``linear.weight`` is W, (hidden_size, hidden_size + input_size), its first
    hidden_size columns acting on h_{t-1}; ``linear.bias`` is b, (hidden_size,).

    Shapes: x (batch, input_size); h (batch, hidden_size).
    """

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.linear = nn.Linear(hidden_size + input_size, hidden_size)
        _reset_uniform(self, hidden_size)

    def forward(self, x: Tensor, h: Tensor) -> Tensor:
        return torch.tanh(self.linear(torch.cat([h, x], dim=1)))

    def zero_state(self, batch_size: int, like: Tensor) -> Tensor:
        """h_0 = 0, with the dtype and device of ``like``."""
        return like.new_zeros(batch_size, self.hidden_size)

    @torch.no_grad()
    def load_from_torch(self, cell_or_layer: nn.Module, layer: int = 0, reverse: bool = False) -> RNNCell:
        """Copy the weights of a ``torch.nn.RNNCell`` or one layer/direction of a ``torch.nn.RNN``.

        torch computes tanh(W_ih x + b_ih + W_hh h + b_hh): W = [W_hh, W_ih], b = b_ih + b_hh.
        """
        if getattr(cell_or_layer, "nonlinearity", "tanh") != "tanh":
            raise ValueError(
                f"only tanh RNNs have a reference cell, got nonlinearity={cell_or_layer.nonlinearity!r}"
            )
        w_ih, w_hh, b_ih, b_hh = _torch_weights(cell_or_layer, nn.RNNCell, nn.RNN, layer, reverse)
        _check_shapes(self, 1, w_ih, w_hh)
        return _copy_parameters(self, self.from_torch_layout(w_ih, w_hh, b_ih, b_hh))

    @staticmethod
    def from_torch_layout(w_ih: Tensor, w_hh: Tensor, b_ih: Tensor, b_hh: Tensor) -> dict[str, Tensor]:
        """This cell's parameters as differentiable functions of torch's: W = [W_hh, W_ih],
        b = b_ih + b_hh. Gradients flow back into torch's weights."""
        return {"linear.weight": torch.cat([w_hh, w_ih], dim=1), "linear.bias": b_ih + b_hh}


class LSTMCell(nn.Module):
    """One step of a long short-term memory cell (Hochreiter & Schmidhuber, 1997).

        f_t = σ(W_f [h_{t-1}; x_t] + b_f)      forget gate: what to drop from memory
        i_t = σ(W_i [h_{t-1}; x_t] + b_i)      input gate: how much of the candidate to store
        c̃_t = tanh(W_c [h_{t-1}; x_t] + b_c)   candidate memory
        c_t = f_t ⊙ c_{t-1} + i_t ⊙ c̃_t        cell update: no non-linearity on this path
        o_t = σ(W_o [h_{t-1}; x_t] + b_o)      output gate
        h_t = o_t ⊙ tanh(c_t)

    Parameters: ``gates`` is one linear map over [h_{t-1}; x_t] computing all four gates;
    ``gates.weight`` is [W_f; W_i; W_c; W_o] stacked by rows, (4·hidden_size,
    hidden_size + input_size), its first hidden_size columns acting on h_{t-1};
    ``gates.bias`` is [b_f; b_i; b_c; b_o], (4·hidden_size,).

    Shapes: x (batch, input_size); h, c (batch, hidden_size).
    """

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.gates = nn.Linear(hidden_size + input_size, 4 * hidden_size)
        _reset_uniform(self, hidden_size)

    def forward(self, x: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        h, c = state
        f, i, c_tilde, o = self.gates(torch.cat([h, x], dim=1)).chunk(4, dim=1)
        f, i, c_tilde, o = torch.sigmoid(f), torch.sigmoid(i), torch.tanh(c_tilde), torch.sigmoid(o)
        c = f * c + i * c_tilde
        h = o * torch.tanh(c)
        return h, c

    def zero_state(self, batch_size: int, like: Tensor) -> tuple[Tensor, Tensor]:
        """(h_0, c_0) = (0, 0), with the dtype and device of ``like``."""
        zeros = like.new_zeros(batch_size, self.hidden_size)
        return zeros, zeros.clone()

    @torch.no_grad()
    def load_from_torch(self, cell_or_layer: nn.Module, layer: int = 0, reverse: bool = False) -> LSTMCell:
        """Copy the weights of a ``torch.nn.LSTMCell`` or one layer/direction of a ``torch.nn.LSTM``.

        torch stacks its gates in the order i, f, g (= c̃), o and has two biases; here the
        order is f, i, c̃, o, W_k = [W_hk, W_ik] and b_k = b_ik + b_hk.
        """
        w_ih, w_hh, b_ih, b_hh = _torch_weights(cell_or_layer, nn.LSTMCell, nn.LSTM, layer, reverse)
        _check_shapes(self, 4, w_ih, w_hh)
        return _copy_parameters(self, self.from_torch_layout(w_ih, w_hh, b_ih, b_hh))

    @staticmethod
    def from_torch_layout(w_ih: Tensor, w_hh: Tensor, b_ih: Tensor, b_hh: Tensor) -> dict[str, Tensor]:
        """This cell's parameters as differentiable functions of torch's (see load_from_torch)."""

        def reorder(torch_stacked: Tensor) -> Tensor:
            by_gate = dict(zip("ifgo", torch_stacked.chunk(4, dim=0)))
            return torch.cat([by_gate[gate] for gate in "figo"], dim=0)

        return {"gates.weight": torch.cat([reorder(w_hh), reorder(w_ih)], dim=1),
                "gates.bias": reorder(b_ih + b_hh)}


class GRUCell(nn.Module):
    """One step of a gated recurrent unit, in the variant of torch and cuDNN.

        r_t = σ(W_r [h_{t-1}; x_t] + b_r)                          reset gate
        z_t = σ(W_z [h_{t-1}; x_t] + b_z)                          update gate: how much of h_{t-1} to keep
        n_t = tanh(W_n x_t + b_in + r_t ⊙ (U_n h_{t-1} + b_hn))    candidate state
        h_t = (1 − z_t) ⊙ n_t + z_t ⊙ h_{t-1}

    This is *not* the candidate of Cho et al. (2014), which resets h_{t-1} before it is
    multiplied:

        n_t = tanh(W_n x_t + U_n (r_t ⊙ h_{t-1}) + b_n)            (Cho et al., 2014)

    torch and cuDNN apply the reset gate *after* the hidden matmul, so U_n h_{t-1} can be
    computed in one matmul together with the hidden parts of r_t and z_t, before r_t is
    known. Since r ⊙ (U h) ≠ U (r ⊙ h), the two variants compute different functions and
    their weights are not interchangeable. The hidden bias b_hn sits inside r_t ⊙ (...),
    so, unlike the other biases, it cannot be merged with b_in.

    Parameters: ``gates`` is one linear map over [h_{t-1}; x_t] computing both gates;
    ``gates.weight`` is [W_r; W_z], (2·hidden_size, hidden_size + input_size), its first
    hidden_size columns acting on h_{t-1}; ``gates.bias`` is [b_r; b_z].
    ``candidate_x`` is W_n x + b_in (weight (hidden_size, input_size)) and ``candidate_h``
    is U_n h + b_hn (weight (hidden_size, hidden_size)).

    Shapes: x (batch, input_size); h (batch, hidden_size).
    """

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.gates = nn.Linear(hidden_size + input_size, 2 * hidden_size)
        self.candidate_x = nn.Linear(input_size, hidden_size)
        self.candidate_h = nn.Linear(hidden_size, hidden_size)
        _reset_uniform(self, hidden_size)

    def forward(self, x: Tensor, h: Tensor) -> Tensor:
        r, z = torch.sigmoid(self.gates(torch.cat([h, x], dim=1))).chunk(2, dim=1)
        n = torch.tanh(self.candidate_x(x) + r * self.candidate_h(h))
        return (1 - z) * n + z * h

    def zero_state(self, batch_size: int, like: Tensor) -> Tensor:
        """h_0 = 0, with the dtype and device of ``like``."""
        return like.new_zeros(batch_size, self.hidden_size)

    @torch.no_grad()
    def load_from_torch(self, cell_or_layer: nn.Module, layer: int = 0, reverse: bool = False) -> GRUCell:
        """Copy the weights of a ``torch.nn.GRUCell`` or one layer/direction of a ``torch.nn.GRU``.

        torch stacks its gates in the order r, z, n, as here. W_r = [W_hr, W_ir] and
        b_r = b_ir + b_hr (likewise for z); the candidate keeps torch's two halves as they are.
        """
        w_ih, w_hh, b_ih, b_hh = _torch_weights(cell_or_layer, nn.GRUCell, nn.GRU, layer, reverse)
        _check_shapes(self, 3, w_ih, w_hh)
        return _copy_parameters(self, self.from_torch_layout(w_ih, w_hh, b_ih, b_hh))

    @staticmethod
    def from_torch_layout(w_ih: Tensor, w_hh: Tensor, b_ih: Tensor, b_hh: Tensor) -> dict[str, Tensor]:
        """This cell's parameters as differentiable functions of torch's (see load_from_torch)."""
        w_ir, w_iz, w_in = w_ih.chunk(3, dim=0)
        w_hr, w_hz, w_hn = w_hh.chunk(3, dim=0)
        b_ir, b_iz, b_in = b_ih.chunk(3, dim=0)
        b_hr, b_hz, b_hn = b_hh.chunk(3, dim=0)
        w_r, w_z = torch.cat([w_hr, w_ir], dim=1), torch.cat([w_hz, w_iz], dim=1)
        return {
            "gates.weight": torch.cat([w_r, w_z], dim=0),
            "gates.bias": torch.cat([b_ir + b_hr, b_iz + b_hz]),
            "candidate_x.weight": w_in, "candidate_x.bias": b_in,
            "candidate_h.weight": w_hn, "candidate_h.bias": b_hn,
        }


Cell = Union[RNNCell, LSTMCell, GRUCell]

#: The reference cell and the torch cell and fused layer it reads its weights from.
TORCH_TWINS: dict[type[nn.Module], tuple[type[nn.RNNCellBase], type[nn.RNNBase]]] = {
    RNNCell: (nn.RNNCell, nn.RNN),
    LSTMCell: (nn.LSTMCell, nn.LSTM),
    GRUCell: (nn.GRUCell, nn.GRU),
}


def parameters_from_torch(cell_type: type[Cell], cell_or_layer: nn.Module, layer: int = 0,
                          reverse: bool = False) -> dict[str, Tensor]:
    """A reference cell's parameters computed from one layer/direction of a torch module.

    Unlike ``load_from_torch`` (a copy), the result stays connected to torch's weights, so
    ``torch.func.functional_call(cell, parameters, ...)`` runs the readable equations on
    the fused layer's own parameters and its gradients reach them.
    """
    cell_twin, layer_twin = TORCH_TWINS[cell_type]
    weights = _torch_weights(cell_or_layer, cell_twin, layer_twin, layer, reverse)
    return cell_type.from_torch_layout(*weights)


def _select(keep_new: Tensor, new: State, old: State) -> State:
    """``new`` where ``keep_new`` (batch, 1) is true, else ``old``; for h or for (h, c)."""
    if isinstance(new, tuple):
        return tuple(torch.where(keep_new, n, o) for n, o in zip(new, old))  # type: ignore[return-value]
    return torch.where(keep_new, new, old)


def _reverse_within_lengths(x: Tensor, lengths: Tensor) -> Tensor:
    """Reverse each sentence's first ``length`` positions, leaving its padding in place.

    The permutation is its own inverse, so it also maps reversed outputs back.
    """
    steps = torch.arange(x.size(1), device=x.device).unsqueeze(0)  # (1, seq)
    lengths = lengths.unsqueeze(1)  # (batch, 1)
    index = torch.where(steps < lengths, lengths - 1 - steps, steps)  # (batch, seq)
    return x.gather(1, index.unsqueeze(2).expand(-1, -1, x.size(2)))


def run_cell(
    cell: Cell,
    x: Tensor,
    lengths: Tensor,
    state: State | None = None,
    reverse: bool = False,
) -> tuple[Tensor, State]:
    """Unroll ``cell`` over a padded batch, as a torch RNN layer reads a packed sequence.

    Sentence b has ``lengths[b]`` real positions; beyond them its state does not change and
    its outputs are zero. With ``reverse=True`` each sentence is read from its last real
    token back to its first (its padding stays at the end), as in the backward direction of
    a bidirectional layer.

    Shapes: x (batch, seq, input_size); lengths (batch,) integers, on any device;
    state, if given, as the cell's forward takes it (zeros otherwise).
    Returns outputs (batch, seq, hidden_size), aligned with x, and the final state of each
    sentence: its state after its last real position (its first, when reversed).
    """
    if x.dim() != 3:
        raise ValueError(f"x must be (batch, seq, input_size), got shape {tuple(x.shape)}")
    batch, seq, _ = x.shape
    lengths = lengths.to(device=x.device, dtype=torch.long)
    if lengths.shape != (batch,):
        raise ValueError(f"lengths must be ({batch},), got shape {tuple(lengths.shape)}")
    if batch and (int(lengths.min()) < 0 or int(lengths.max()) > seq):
        raise ValueError(f"lengths must lie in [0, {seq}]")

    if state is None:
        state = cell.zero_state(batch, x)
    if reverse:
        x = _reverse_within_lengths(x, lengths)

    alive = torch.arange(seq, device=x.device).unsqueeze(0) < lengths.unsqueeze(1)  # (batch, seq)
    outputs = []
    for t in range(seq):
        keep_new = alive[:, t : t + 1]  # (batch, 1)
        state = _select(keep_new, cell(x[:, t], state), state)
        h = state[0] if isinstance(state, tuple) else state
        outputs.append(torch.where(keep_new, h, torch.zeros_like(h)))

    if outputs:
        output = torch.stack(outputs, dim=1)
    else:
        output = x.new_zeros(batch, 0, cell.hidden_size)
    if reverse:
        output = _reverse_within_lengths(output, lengths)
    return output, state
