"""Inference copies of the layers a decoder runs once per output piece, on faster kernels.

A search step multiplies a few hundred rows (sentences × beams, fewer as sentences
finish) by the same weights, once per target piece. `swap_step_layers(model, linear)`
replaces, in a loaded model, exactly those layers: the decoder RNN (by a `StepRecurrent`
with the same `step(x, state)` as `rnmt.nn.rnn.RNN`), the attention's query projection
W_q, the deep-output / Luong output layer, the tied projection and the vocabulary
projection, each by `linear(weight, bias)`. The encoder, embeddings, gate arithmetic and
attention scores stay as they are. Two kinds of `linear`:

- `OneDNNLinear` (`rnmt.nn.onednn`, with the measurements): fp32, the weight reordered
  once into oneDNN's blocked layout. `pack_for_cpu` swaps these in for every fp32
  translation on a CPU: same numbers up to rounding, and faster than torch's fp32 `addmm`
  (MKL), whose small-row products use one core. Beam 5 over Multi30k test_2016 with the
  reference model: 1.21× the unpacked speed (1.17–1.40× over five comparisons), greedy
  1.28×, BLEU unchanged (`benchmarks/translate_speed.py`, variants `-unpacked`). A torch
  build without oneDNN keeps the model as it is (`onednn_runs`).
  `pack_for_cpu(model, torch.bfloat16)` (`--precision bf16` on a CPU) makes the same
  layers multiply in bf16, on AMX where the CPU has it; everything around the products
  stays fp32.
- `rnmt.quantize.Int8Linear`: int8 weights and activations (`--quantize int8`).

Checkpoints never hold packed layers: packing happens after loading, and the model's
state dict no longer describes the swapped layers.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor, nn

from rnmt.nn.onednn import OneDNNLinear, onednn_runs
from rnmt.nn.rnn import RNN, State, step_stack

# A linear layer from an fp32 weight (out_features, in_features) and an optional bias.
LinearFactory = Callable[[Tensor, "Tensor | None"], nn.Module]


class StepRecurrent(nn.Module):
    """A unidirectional RNN/LSTM/GRU stack stepped one position at a time, its gate matrix
    products on `linear` layers and its gate arithmetic in fp32; torch's gate layout (LSTM
    i, f, g, o; GRU r, z, n).

        LSTM, tanh RNN:  a_t = [W_ih W_hh] [x_t; h_{t-1}] + (b_ih + b_hh)   one product
        GRU:             a_t = W_ih x_t + b_ih,  b_t = W_hh h_{t-1} + b_hh  two (r ⊙ b_n)

    then, LSTM:  i, f, o = σ(a_i), σ(a_f), σ(a_o);  g = tanh(a_g)
                 c_t = f ⊙ c_{t-1} + i ⊙ g;   h_t = o ⊙ tanh(c_t)
         GRU:    r, z = σ(a_r + b_r), σ(a_z + b_z);  n = tanh(a_n + r ⊙ b_n)
                 h_t = (1 - z) ⊙ n + z ⊙ h_{t-1}
         RNN:    h_t = tanh(a_t)

    Shapes as `RNN.step`: x (batch, input) -> (batch, hidden); state (layers, batch,
    hidden), a pair (h, c) for an LSTM.
    """

    def __init__(self, rnn: RNN, linear: LinearFactory) -> None:
        super().__init__()
        if rnn.directions != 1:
            raise ValueError("StepRecurrent steps a unidirectional stack")
        self.cell = rnn.cell
        self.num_layers = rnn.num_layers
        self.hidden_size = rnn.hidden_size
        self.gemms = nn.ModuleList()
        for k in range(rnn.num_layers):
            w_ih = getattr(rnn.layer, f"weight_ih_l{k}")
            w_hh = getattr(rnn.layer, f"weight_hh_l{k}")
            b_ih = getattr(rnn.layer, f"bias_ih_l{k}", None)
            b_hh = getattr(rnn.layer, f"bias_hh_l{k}", None)
            if self.cell == "gru":  # the hidden part of n is gated by r: two products
                self.gemms.append(nn.ModuleList([linear(w_ih, b_ih), linear(w_hh, b_hh)]))
            else:
                bias = None if b_ih is None else b_ih + b_hh
                self.gemms.append(linear(torch.cat([w_ih, w_hh], dim=1), bias))

    def step(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        """One time step of the whole stack (as `RNN.step`, without training dropout)."""
        return step_stack(self._step_layer, self.num_layers, x, state)

    def _step_layer(self, k: int, x: Tensor, state: State) -> State:
        """Layer k, one step: x (batch, input) and its state -> its new state."""
        if self.cell == "lstm":
            assert isinstance(state, tuple)
            return self._lstm(k, x, *state)
        assert isinstance(state, Tensor)
        if self.cell == "gru":
            return self._gru(k, x, state)
        return torch.tanh(self.gemms[k](torch.cat([x, state], dim=-1)))

    def _lstm(self, k: int, x: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        """x (batch, input), h and c (batch, hidden) -> the new (h, c)."""
        gates = self.gemms[k](torch.cat([x, h], dim=-1))
        H = self.hidden_size
        # In place on the fresh product: i and f are adjacent, so one sigmoid call.
        gates[:, : 2 * H].sigmoid_()
        gates[:, 3 * H :].sigmoid_()
        i, f, g, o = gates.chunk(4, dim=-1)
        c = torch.addcmul(f * c, i, g.tanh_())
        return o * torch.tanh(c), c

    def _gru(self, k: int, x: Tensor, h: Tensor) -> Tensor:
        """x (batch, input), h (batch, hidden) -> the new h."""
        input_part, hidden_part = self.gemms[k]
        a, b = input_part(x), hidden_part(h)
        H = self.hidden_size
        rz = torch.sigmoid(a[:, : 2 * H] + b[:, : 2 * H])
        r, z = rz.chunk(2, dim=-1)
        n = torch.tanh(torch.addcmul(a[:, 2 * H :], r, b[:, 2 * H :]))
        return torch.lerp(n, h, z)  # (1 - z) ⊙ n + z ⊙ h

    def forward(self, x: Tensor, lengths: Tensor | None, state: State
                ) -> tuple[Tensor, State]:
        """Whole sequences, step by step (teacher forcing through a swapped decoder).
        Shapes: x (batch, seq, input) -> (batch, seq, hidden). Rows are not padded inside
        the recurrence (`lengths` must be None): a decoder's padding sits after its last
        real position, which no earlier output depends on. `state` is required: decoders
        start from the bridge's state, a language model from its zeros (`init_state`)."""
        if lengths is not None:
            raise ValueError("StepRecurrent runs decoders: whole rows, no lengths")
        outputs = []
        for t in range(x.size(1)):
            out, state = self.step(x[:, t], state)
            outputs.append(out)
        return torch.stack(outputs, dim=1), state


def _swap_linear(parent: nn.Module, name: str, linear: LinearFactory) -> None:
    """parent.name = linear(weight, bias) when parent.name is an nn.Linear."""
    layer = getattr(parent, name, None)
    if isinstance(layer, nn.Linear):
        setattr(parent, name, linear(layer.weight, layer.bias))


@torch.no_grad()
def swap_step_layers(model: nn.Module, linear: LinearFactory) -> nn.Module:
    """Swap the per-step layers of a loaded fp32 CPU model (Seq2Seq, LanguageModel or an
    Ensemble of them) for ones built by `linear`, in place, and return it, in eval mode.

    A tied output projection (Press & Wolf) is swapped as the generator only: the
    embedding it shares its matrix with stays as it is.
    """
    members = getattr(model, "members", None)
    for member in members if members is not None else [model]:
        decoder = getattr(member, "decoder", member)  # a language model is its own decoder
        if isinstance(decoder.rnn, RNN):
            decoder.rnn = StepRecurrent(decoder.rnn, linear)
        _swap_linear(decoder, "output", linear)
        attention = getattr(decoder, "attention", None)
        if attention is not None:
            _swap_linear(attention, "query_proj", linear)
        _swap_linear(member, "projection", linear)
        _swap_linear(member, "generator", linear)
    return model.eval()


def can_pack(model: nn.Module, dtype: torch.dtype = torch.float32) -> bool:
    """Whether `pack_for_cpu(model, dtype)` packs: an fp32 model on the CPU, where oneDNN
    runs products in `dtype` (`onednn_runs`)."""
    first = next(model.parameters(), None)
    return (first is not None and first.dtype == torch.float32
            and first.device.type == "cpu" and onednn_runs(dtype))


def pack_for_cpu(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """An fp32 CPU model's per-step layers on oneDNN (`OneDNNLinear`), whatever its cell
    implementation (fused or reference: same weights, same numbers), their products in
    `dtype` (fp32, or bf16 for `--precision bf16`); the model unchanged where `can_pack`
    says no."""
    if not can_pack(model, dtype):
        return model
    return swap_step_layers(model, functools.partial(OneDNNLinear, dtype=dtype))
