"""Multi-layer, optionally bidirectional recurrent layers over padded batches.

Two implementations of the same function, on the same parameters:

- `impl="fused"` (default): the fused `torch.nn.RNN/LSTM/GRU` on packed sequences (cuDNN
  on a GPU, oneDNN kernels on a CPU), so padding never reaches the recurrence.
- `impl="reference"`: the readable cells of `rnmt.nn.cells`, one Python step per token,
  run on the fused layer's own weights (`torch.func.functional_call` with
  `cells.parameters_from_torch`). Slow, but every step is the lecture's equation, and a
  checkpoint trained with one implementation loads and runs in the other.

The torch layer always holds the parameters, so both have the same state dict.

State convention (as torch): `h` of shape (layers * directions, batch, hidden), and for an
LSTM the pair `(h, c)`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from rnmt.nn import cells

State = Tensor | tuple[Tensor, Tensor]

CELLS: dict[str, type[nn.RNNBase]] = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}
READABLE: dict[str, type[cells.Cell]] = {
    "rnn": cells.RNNCell, "lstm": cells.LSTMCell, "gru": cells.GRUCell,
}
IMPLS = ("fused", "reference")


class _Unrolled(nn.Module):
    """`cells.run_cell` as a module, so `functional_call` can hand it the cell's weights."""

    def __init__(self, cell: nn.Module) -> None:
        super().__init__()
        self.cell = cell

    def forward(self, x: Tensor, lengths: Tensor, state: State, reverse: bool
                ) -> tuple[Tensor, State]:
        return cells.run_cell(self.cell, x, lengths, state, reverse)


class RNN(nn.Module):
    """A stack of recurrent layers; `dropout` applies between layers (not after the last).

    Shapes: x (batch, seq, input_size); lengths (batch,) on the CPU;
    outputs (batch, seq, hidden_size * directions), zero at padded positions.
    """

    def __init__(
        self,
        cell: str,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bidirectional: bool = False,
        dropout: float = 0.0,
        impl: str = "fused",
    ) -> None:
        super().__init__()
        if cell not in CELLS:
            raise ValueError(f"unknown cell {cell!r}; choose from {sorted(CELLS)}")
        if impl not in IMPLS:
            raise ValueError(f"unknown cell implementation {impl!r}; choose from {IMPLS}")
        self.cell = cell
        self.impl = impl
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.directions = 2 if bidirectional else 1
        extra = {"nonlinearity": "tanh"} if cell == "rnn" else {}
        self.layer = CELLS[cell](
            input_size,
            hidden_size,
            num_layers=num_layers,
            bidirectional=bidirectional,
            dropout=dropout if num_layers > 1 else 0.0,
            batch_first=True,
            **extra,
        )
        # The readable cells own no weights: they are built on the meta device (no memory)
        # and get the fused layer's weights at every call. A plain list keeps them out of
        # the state dict, so checkpoints are the same for both implementations.
        self._readable: list[_Unrolled] = []
        if impl == "reference":
            with torch.device("meta"):
                for k in range(num_layers):
                    size = input_size if k == 0 else hidden_size * self.directions
                    self._readable.append(_Unrolled(READABLE[cell](size, hidden_size)))

    @property
    def output_size(self) -> int:
        return self.hidden_size * self.directions

    def forward(
        self, x: Tensor, lengths: Tensor | None = None, state: State | None = None
    ) -> tuple[Tensor, State]:
        """Run over whole sequences; `lengths=None` means no padding (every row is full)."""
        if self.impl == "reference":
            return self._reference_forward(x, lengths, state)
        if lengths is None:
            return self.layer(x, state)
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, final = self.layer(packed, state)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=x.size(1))
        return out, final

    def step(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        """One time step of a unidirectional stack. Shapes: x (batch, input) -> (batch, hidden).

        Fused: the layer's own weights go through torch's single-step cell kernels
        (`torch.lstm_cell` & co.); for one step they are about twice as fast as calling the
        sequence kernel on a length-1 sequence. Reference: the readable cell, same weights.
        """
        return step_stack(self._step_layer, self.num_layers, x, state, self.layer.dropout,
                          self.training)

    def _step_layer(self, k: int, x: Tensor, state: State) -> State:
        """Layer k, one step: x (batch, input) and its state -> its new state."""
        if self.impl == "reference":
            cell = self._readable[k].cell
            return functional_call(cell, self._parameters_of(k, False, prefix=""), (x, state))
        weights = (
            getattr(self.layer, f"weight_ih_l{k}"),
            getattr(self.layer, f"weight_hh_l{k}"),
            getattr(self.layer, f"bias_ih_l{k}"),
            getattr(self.layer, f"bias_hh_l{k}"),
        )
        return STEP_KERNELS[self.cell](x, state, *weights)

    def _parameters_of(self, k: int, reverse: bool, prefix: str = "cell.") -> dict[str, Tensor]:
        """Layer k's (one direction's) fused weights in the readable cell's layout."""
        values = cells.parameters_from_torch(READABLE[self.cell], self.layer, k, reverse)
        return {prefix + name: value for name, value in values.items()}

    def _reference_forward(
        self, x: Tensor, lengths: Tensor | None, state: State | None
    ) -> tuple[Tensor, State]:
        """The fused layer's computation, spelled out: layer by layer, direction by
        direction, each one a `run_cell` loop; outputs and final states as torch lays them out.
        """
        batch = x.size(0)
        if lengths is None:
            lengths = torch.full((batch,), x.size(1), dtype=torch.long)
        is_lstm = self.cell == "lstm"
        if state is None:
            zeros = x.new_zeros(self.num_layers * self.directions, batch, self.hidden_size)
            state = (zeros, zeros.clone()) if is_lstm else zeros
        h_all, c_all = state if isinstance(state, tuple) else (state, None)
        final_h, final_c = [], []
        for k in range(self.num_layers):
            if k > 0 and self.training and self.layer.dropout > 0:
                x = F.dropout(x, self.layer.dropout, training=True)
            outputs = []
            for direction in range(self.directions):
                i = k * self.directions + direction  # torch's index: layer-major
                initial = (h_all[i], c_all[i]) if is_lstm else h_all[i]
                out, final = functional_call(
                    self._readable[k], self._parameters_of(k, direction == 1),
                    (x, lengths, initial, direction == 1),
                )
                outputs.append(out)
                final_h.append(final[0] if is_lstm else final)
                if is_lstm:
                    final_c.append(final[1])
            x = torch.cat(outputs, dim=-1)
        if is_lstm:
            return x, (torch.stack(final_h), torch.stack(final_c))
        return x, torch.stack(final_h)


def step_stack(step_layer: Callable[[int, Tensor, State], State], num_layers: int, x: Tensor,
               state: State, dropout: float = 0.0, training: bool = False
               ) -> tuple[Tensor, State]:
    """One time step of a unidirectional stack, layer by layer: layer k reads the new h of
    layer k-1 (with dropout between layers when training, as the fused layer does) and its
    own state; `step_layer(k, x, layer_state)` returns layer k's new state.

    Shapes: x (batch, input); state (layers, batch, hidden), or the pair (h, c) for an
    LSTM, whose layer states are pairs too. Returns the top layer's h (batch, hidden) and
    the stack's new state, laid out as `state`.
    """
    is_lstm = isinstance(state, tuple)
    h_all, c_all = state if is_lstm else (state, None)
    new_h, new_c = [], []
    for k in range(num_layers):
        if k > 0 and training and dropout > 0:
            x = F.dropout(x, dropout, training=True)
        own = (h_all[k], c_all[k]) if is_lstm else h_all[k]
        out = step_layer(k, x, own)
        x = out[0] if is_lstm else out
        new_h.append(x)
        if is_lstm:
            new_c.append(out[1])
    if is_lstm:
        return x, (torch.stack(new_h), torch.stack(new_c))
    return x, torch.stack(new_h)


STEP_KERNELS = {"rnn": torch.rnn_tanh_cell, "lstm": torch.lstm_cell, "gru": torch.gru_cell}


def compact_rnn_weights(model: nn.Module) -> nn.Module:
    """Lay each fused RNN's weights out as the one block cuDNN reads, after the model has
    moved to a GPU or changed dtype: `Module.to` leaves them in separate tensors, and cuDNN
    would then copy them together at every call (and warn about it). No-op on the CPU, and
    for bf16 weights: torch's `flatten_parameters` (2.13) only takes fp16/fp32/fp64.
    Returns the model."""
    for module in model.modules():
        if isinstance(module, nn.RNNBase):
            module.flatten_parameters()
    return model


def final_states(rnn: RNN, final: State) -> list[Tensor]:
    """Per layer, the final state with both directions concatenated: (batch, directions*hidden).

    For an LSTM this concatenates `h` and `c` along the last axis too, so a bridge sees all of
    the encoder's last memory.
    """
    parts = final if isinstance(final, tuple) else (final,)
    per_layer: list[Tensor] = []
    for layer in range(rnn.num_layers):
        pieces = []
        for part in parts:
            for direction in range(rnn.directions):
                pieces.append(part[layer * rnn.directions + direction])
        per_layer.append(torch.cat(pieces, dim=-1))
    return per_layer
