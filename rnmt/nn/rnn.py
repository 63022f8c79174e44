"""Multi-layer, optionally bidirectional recurrent layers over padded batches.

Two implementations of the same function, on the same parameters:

- `impl="fused"` (default): the fused `torch.nn.RNN/LSTM/GRU` on packed sequences (cuDNN
  on a GPU, oneDNN kernels on a CPU), so padding never reaches the recurrence. (An LSTM
  training on the CPU takes the dense kernel with padding held inert instead, which is
  faster there: `RNN._dense_lstm_forward`.)
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
from rnmt.nn.dropout import dropout as apply_dropout
from rnmt.nn.linear import linear
from rnmt.nn.lstm_layer import SATURATE, lstm_layer_bf16
from rnmt.nn.lstm_steps import LSTMSteps
from rnmt.nn.onednn import recurrent_product_dtype, training_rows
from rnmt.precision import cpu_training_products

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
        if self.cell == "lstm" and x.device.type == "cpu" and torch.is_grad_enabled():
            return self._dense_lstm_forward(x, lengths, state)
        return self._packed_forward(x, lengths, state)

    def _packed_forward(
        self, x: Tensor, lengths: Tensor, state: State | None
    ) -> tuple[Tensor, State]:
        """The fused layer on a packed sequence: padding never enters the recurrence."""
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, final = self.layer(packed, state)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=x.size(1))
        return out, final

    def _dense_lstm_forward(
        self, x: Tensor, lengths: Tensor, state: State | None
    ) -> tuple[Tensor, State]:
        """What the packed-sequence LSTM computes, through the dense (oneDNN) LSTM kernel.

        Why: on the CPU torch runs a packed LSTM one step at a time, and its backward
        zero-fills and adds a whole (Σ lengths, 4 * hidden) gradient at every step; the dense
        kernel is one oneDNN primitive forward and backward (reference encoder, training
        batches of 3000 tokens: 477 -> 345 ms forward + backward). Two things make the
        padding harmless:

        - the reverse direction reads each row reversed within its own length, so its
          padding too comes after the real pieces; its outputs are reversed back. From
          a zero state (no `state` given: an encoder) it reads the whole batch reversed
          instead (`flip`, whose backward is a flip: the gather's scattered back and
          zero-filled), the padding first: there h and c stay exactly 0, the state each
          row's real pieces start from (below);
        - every padded position gets an extra input feature 1 whose weights add −SATURATE
          to the input gate and +SATURATE to the forget gate. There i = 0 and f = 1 exactly
          (σ saturates), so c_t = f ⊙ c_{t-1} + i ⊙ g = c_{t-1} bit for bit: the last c is
          the c of each row's last real piece. The final h is read from the outputs at
          length - 1, and padded outputs are zeroed as `pad_packed_sequence` does.

        Gradients are the packed LSTM's too: at padded positions σ'(±SATURATE) = 0, so no
        gradient reaches the gates there, and dc passes through f = 1 unchanged.

        In bf16 CPU training (`cpu_training_products`, with oneDNN's bf16 products) each
        direction is `rnmt.nn.lstm_layer.lstm_layer_bf16` instead, which holds the padding
        inert the same way (the pre-activations themselves pinned, no extra feature) and
        ran the reference model's 350 updates 1.09× faster than oneDNN's bf16 LSTM kernel.
        Its products run at a few shapes only: rows up to `training_rows(batch)` (extra
        rows of length 1, dropped after), steps up to a multiple of 8 (more inert padding).
        oneDNN builds and keeps a kernel per shape it meets, and training batches seldom
        repeat one: the reference model's Multi30k batches have 80 (batch, steps) shapes.
        (Measured with oneDNN's LSTM kernel over 350 updates, the same validation
        perplexity: bf16 peak RSS about 150 MB lower at the same speed (docs/training.md,
        Memory); fp32 1,401 -> 1,344 MB but 4% slower (4,142 -> 3,969 target tokens/s),
        so fp32 runs at the batch's own shape.)
        Shapes as `forward`.
        """
        real_batch, real_steps, _ = x.shape
        batch, steps = real_batch, real_steps
        bf16_layer = recurrent_product_dtype(x) == torch.bfloat16
        if cpu_training_products(x) == torch.bfloat16:
            batch, steps = training_rows(real_batch), -(-real_steps // 8) * 8
            x = F.pad(x, (0, 0, 0, steps - real_steps, 0, batch - real_batch))
            lengths = torch.cat([lengths, lengths.new_ones(batch - real_batch)])
            if state is not None:
                state = tuple(F.pad(s, (0, 0, 0, batch - real_batch)) for s in state)
        hidden = self.hidden_size
        positions = torch.arange(steps)
        valid = positions[None, :] < lengths[:, None]  # (batch, steps)
        padded = ~valid
        pad_feature = padded.unsqueeze(-1).to(x.dtype)  # (batch, steps, 1)
        keep = 1.0 - pad_feature
        zero_start = state is None
        within = None if zero_start else torch.where(valid, lengths[:, None] - 1 - positions,
                                                       positions)
        last = (lengths - 1).view(batch, 1, 1).expand(batch, 1, hidden)
        if not bf16_layer:  # the pad feature's weights, for torch's kernel (i, f, g, o)
            pad_weights = x.new_zeros(4 * hidden, 1)
            pad_weights[:hidden] = -SATURATE
            pad_weights[hidden : 2 * hidden] = SATURATE

        def run(k: int, reverse: bool, x: Tensor, initial: State) -> tuple[Tensor, State]:
            suffix = f"_l{k}" + ("_reverse" if reverse else "")
            names = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
            w_ih, w_hh, b_ih, b_hh = (getattr(self.layer, name + suffix) for name in names)
            flip = reverse and zero_start
            if flip:
                inputs, pads, pad_in = x.flip(1), padded.flip(1), pad_feature.flip(1)
            else:
                inputs = _reverse_within(x, within) if reverse else x
                pads, pad_in = padded, pad_feature
            if bf16_layer:
                out, c = lstm_layer_bf16(inputs, pads, initial, w_ih, w_hh, b_ih, b_hh)
            else:
                h0, c0 = initial
                out, _, c = torch.lstm(torch.cat([inputs, pad_in], -1),
                                       (h0.unsqueeze(0), c0.unsqueeze(0)),
                                       [torch.cat([w_ih, pad_weights], 1), w_hh, b_ih, b_hh],
                                       True, 1, 0.0, self.training, False, True)
                c = c[0]
            if flip:  # every row's real pieces come last
                return out.flip(1) * keep, (out[:, -1], c)
            h = out.gather(1, last).squeeze(1)
            out = _reverse_within(out, within) if reverse else out
            return out * keep, (h, c)

        out, (h, c) = self._layer_by_layer(x, state, run)
        return out[:real_batch, :real_steps], (h[:, :real_batch], c[:, :real_batch])

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
        if lengths is None:
            lengths = torch.full((x.size(0),), x.size(1), dtype=torch.long)

        def run(k: int, reverse: bool, x: Tensor, initial: State) -> tuple[Tensor, State]:
            return functional_call(self._readable[k], self._parameters_of(k, reverse),
                                   (x, lengths, initial, reverse))

        return self._layer_by_layer(x, state, run)

    def _layer_by_layer(
        self, x: Tensor, state: State | None,
        run: Callable[[int, bool, Tensor, State], tuple[Tensor, State]],
    ) -> tuple[Tensor, State]:
        """The stack, one layer and direction at a time: `run(k, reverse, x, initial)` gives
        one direction's outputs (batch, seq, hidden) and final state; a layer's directions,
        concatenated, feed the next (with dropout between layers when training). Initial
        states default to zeros; final states are laid out as torch's (layer-major)."""
        is_lstm = self.cell == "lstm"
        if state is None:
            zeros = x.new_zeros(self.num_layers * self.directions, x.size(0), self.hidden_size)
            state = (zeros, zeros.clone()) if is_lstm else zeros
        h_all, c_all = state if isinstance(state, tuple) else (state, None)
        final_h, final_c = [], []
        for k in range(self.num_layers):
            if k > 0 and self.training and self.layer.dropout > 0:
                x = apply_dropout(x, self.layer.dropout, training=True)
            outputs = []
            for direction in range(self.directions):
                i = k * self.directions + direction  # torch's index: layer-major
                initial = (h_all[i], c_all[i]) if is_lstm else h_all[i]
                out, final = run(k, direction == 1, x, initial)
                outputs.append(out)
                final_h.append(final[0] if is_lstm else final)
                if is_lstm:
                    final_c.append(final[1])
            x = torch.cat(outputs, dim=-1)
        if is_lstm:
            return x, (torch.stack(final_h), torch.stack(final_c))
        return x, torch.stack(final_h)


class Stepper:
    """`RNN.step` over inputs x_t = [known_t; rest_t] whose `known` part (batch, steps, d)
    is there for every step from the start (a decoder's embeddings; rest_t is its context
    vector or attentional state, known only at step t).

    Training a fused LSTM in fp32 on the CPU, the known part's share of the first layer's
    gate product, W_ih[:, :d] known_t + b_ih + b_hh, runs once for all steps (one large
    product), and each step computes only

        a_t = pre_t + [W_ih[:, d:]  W_hh] [rest_t; h_{t-1}]
        i, f, o = σ(a_i), σ(a_f), σ(a_o);  g = tanh(a_g);  c_t = f ⊙ c_{t-1} + i ⊙ g
        h_t = o ⊙ tanh(c_t)

    with upper layers as in `RNN.step`. The per-step products and their gradients were
    most of a teacher-forced decoder's time there: `rnmt.nn.lstm_steps.LSTMSteps` runs
    them on oneDNN, forms the weight's gradient once, and computes the gates and their
    gradients by hand. Under CPU autocast to bf16 (`--precision bf16`)
    the same path multiplies in bf16, the gates and the state kept in fp32
    (`rnmt.precision.cpu_training_products`). Anywhere else (GPU, other autocast, other
    cells, the reference cells, no autograd) each step is `RNN.step` on the concatenated
    input. Same numbers up to rounding either way.
    """

    def __init__(self, rnn: nn.Module, known: Tensor) -> None:
        """rnn: an `RNN`, or any module with its `step` (`rnmt.step_layers.StepRecurrent`)."""
        self.rnn = rnn
        fused_lstm = isinstance(rnn, RNN) and rnn.cell == "lstm" and rnn.impl == "fused"
        products = recurrent_product_dtype(known) if fused_lstm else None
        self.fast = products is not None
        if not self.fast:
            self.known = known.unbind(1)  # unbind: its backward stacks the steps' grads once
            return
        layer, d = rnn.layer, known.size(-1)
        w_ih = layer.weight_ih_l0
        # Time-major, as `LSTMSteps` reads it; `linear`: in bf16 training this product runs
        # in bf16, its result in fp32.
        pre = linear(known.transpose(0, 1), w_ih[:, :d], layer.bias_ih_l0 + layer.bias_hh_l0)
        self.steps = LSTMSteps(torch.cat([w_ih[:, d:], layer.weight_hh_l0], 1), pre, products)

    def step(self, t: int, rest: Tensor, state: State) -> tuple[Tensor, State]:
        """Step t with rest_t (batch, input - d): the top layer's h and the new state,
        as `RNN.step`."""
        if not self.fast:
            return self.rnn.step(torch.cat([self.known[t], rest], dim=-1), state)
        steps = self.steps

        def step_layer(k: int, x: Tensor, layer_state: State) -> State:
            if k > 0:
                return self.rnn._step_layer(k, x, layer_state)
            return steps.step(t, x, *layer_state)

        return step_stack(step_layer, self.rnn.num_layers, rest, state,
                          self.rnn.layer.dropout, self.rnn.training)


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
            x = apply_dropout(x, dropout, training=True)
        own = (layer_of(h_all, k), layer_of(c_all, k)) if is_lstm else layer_of(h_all, k)
        out = step_layer(k, x, own)
        x = out[0] if is_lstm else out
        new_h.append(x)
        if is_lstm:
            new_c.append(out[1])
    if is_lstm:
        return x, (_layers(new_h), _layers(new_c))
    return x, _layers(new_h)


def layer_of(states: Tensor, k: int) -> Tensor:
    """Layer k's state (batch, hidden) of a stack's (layers, batch, hidden) `states`. A
    single layer's is a squeeze, whose backward is a view: an index's backward fills a
    tensor of zeros and copies the gradient into it, at every decoder step."""
    return states.squeeze(0) if states.size(0) == 1 else states[k]


def _layers(states: list[Tensor]) -> Tensor:
    """Per-layer states (batch, hidden) as one (layers, batch, hidden) tensor: a view for
    a single layer (no copy per decoder step, nor one in its backward), else a stack."""
    return states[0].unsqueeze(0) if len(states) == 1 else torch.stack(states)


def _reverse_within(x: Tensor, within: Tensor) -> Tensor:
    """Each row of x (batch, steps, features) reversed within its length; `within`
    (batch, steps) holds, per row, the source position of every output position (padded
    positions map to themselves). Its own inverse."""
    return x.gather(1, within.unsqueeze(-1).expand(-1, -1, x.size(-1)))


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
