"""Multi-layer, optionally bidirectional recurrent layers over padded batches.

The layers are the fused `torch.nn.RNN/LSTM/GRU` on packed sequences (cuDNN on a GPU,
oneDNN kernels on a CPU), so padding never reaches the recurrence. The readable cells of
`rnmt.nn.cells` compute the same functions, step by step (tested against these layers).

State convention (as torch): `h` of shape (layers * directions, batch, hidden), and for an
LSTM the pair `(h, c)`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

State = Tensor | tuple[Tensor, Tensor]

CELLS: dict[str, type[nn.RNNBase]] = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}


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
        if impl != "fused":
            raise ValueError(f"unknown cell implementation {impl!r}")
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

    @property
    def output_size(self) -> int:
        return self.hidden_size * self.directions

    def forward(
        self, x: Tensor, lengths: Tensor | None = None, state: State | None = None
    ) -> tuple[Tensor, State]:
        """Run over whole sequences; `lengths=None` means no padding (every row is full)."""
        if lengths is None:
            return self.layer(x, state)
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, final = self.layer(packed, state)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=x.size(1))
        return out, final

    def step(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        """One time step of a unidirectional stack. Shapes: x (batch, input) -> (batch, hidden).

        Runs the fused layer's own weights through torch's single-step cell kernels
        (`torch.lstm_cell` & co.): for one step they are about twice as fast as calling the
        sequence kernel on a length-1 sequence.
        """
        is_lstm = isinstance(state, tuple)
        h_all, c_all = state if is_lstm else (state, None)
        kernel = STEP_KERNELS[self.cell]
        new_h, new_c = [], []
        for k in range(self.num_layers):
            if k > 0 and self.training and self.layer.dropout > 0:
                x = F.dropout(x, self.layer.dropout, training=True)
            weights = (
                getattr(self.layer, f"weight_ih_l{k}"),
                getattr(self.layer, f"weight_hh_l{k}"),
                getattr(self.layer, f"bias_ih_l{k}"),
                getattr(self.layer, f"bias_hh_l{k}"),
            )
            if is_lstm:
                h, c = kernel(x, (h_all[k], c_all[k]), *weights)
                new_c.append(c)
            else:
                h = kernel(x, h_all[k], *weights)
            new_h.append(h)
            x = h
        if is_lstm:
            return x, (torch.stack(new_h), torch.stack(new_c))
        return x, torch.stack(new_h)


STEP_KERNELS = {"rnn": torch.rnn_tanh_cell, "lstm": torch.lstm_cell, "gru": torch.gru_cell}


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
