"""Inference copies of the layers a decoder runs once per output piece, on faster kernels.

A search step multiplies a few hundred rows (sentences × beams, fewer as sentences
finish) by the same weights, once per target piece. `swap_step_layers(model, linear)`
replaces, in a loaded model, exactly those layers: the decoder RNN (by a `StepRecurrent`
with the same `step(x, state)` as `rnmt.nn.rnn.RNN`), the attention's query projection
W_q, the deep-output / Luong output layer, the tied projection and the vocabulary
projection, each by `linear(weight, bias)`. The encoder, embeddings, gate arithmetic and
attention scores stay as they are. In fp32, an attentive decoder's products also leave
out the previous piece's embedding, whose share is looked up (`TokenProducts`). Two kinds
of `linear`:

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

    def __init__(self, rnn: RNN, linear: LinearFactory, token_dim: int = 0) -> None:
        """`token_dim` > 0 (LSTM and tanh RNN): the first `token_dim` input columns of layer
        0 (a decoder's E y_{t-1}) are left out of its product; `step` then takes their
        share of it, W_ih[:, :token_dim] E y_{t-1}, as `token_part` (`TokenProducts`)."""
        super().__init__()
        if rnn.directions != 1:
            raise ValueError("StepRecurrent steps a unidirectional stack")
        if token_dim and rnn.cell == "gru":
            raise ValueError("StepRecurrent takes a token part for LSTM and tanh RNN cells")
        self.cell = rnn.cell
        self.num_layers = rnn.num_layers
        self.hidden_size = rnn.hidden_size
        self.token_dim = token_dim
        self.gemms = nn.ModuleList()
        for k in range(rnn.num_layers):
            w_ih = getattr(rnn.layer, f"weight_ih_l{k}")
            if k == 0:
                w_ih = w_ih[:, token_dim:]
            w_hh = getattr(rnn.layer, f"weight_hh_l{k}")
            b_ih = getattr(rnn.layer, f"bias_ih_l{k}", None)
            b_hh = getattr(rnn.layer, f"bias_hh_l{k}", None)
            if self.cell == "gru":  # the hidden part of n is gated by r: two products
                self.gemms.append(nn.ModuleList([linear(w_ih, b_ih), linear(w_hh, b_hh)]))
            else:
                bias = None if b_ih is None else b_ih + b_hh
                self.gemms.append(linear(torch.cat([w_ih, w_hh], dim=1), bias))

    def step(self, x: Tensor | None, state: State, token_part: Tensor | None = None
             ) -> tuple[Tensor, State]:
        """One time step of the whole stack (as `RNN.step`, without training dropout).
        With `token_dim`: x is layer 0's input without its token columns (None when there
        is nothing else), and `token_part` (batch, gates) their share of its product."""
        assert (token_part is not None) == bool(self.token_dim)

        def step_layer(k: int, x: Tensor | None, state: State) -> State:
            return self._step_layer(k, x, state, token_part if k == 0 else None)
        return step_stack(step_layer, self.num_layers, x, state)  # type: ignore[arg-type]

    def _step_layer(self, k: int, x: Tensor | None, state: State,
                    token_part: Tensor | None = None) -> State:
        """Layer k, one step: x (batch, input) and its state -> its new state."""
        if self.cell == "gru":
            assert isinstance(state, Tensor) and x is not None
            return self._gru(k, x, state)
        h = state[0] if isinstance(state, tuple) else state
        a = self.gemms[k](h if x is None else torch.cat([x, h], dim=-1))
        if token_part is not None:
            a.add_(token_part)
        if self.cell == "lstm":
            assert isinstance(state, tuple)
            return self._lstm(a, state[1])
        return torch.tanh(a)

    def _lstm(self, gates: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        """The layer's gate pre-activations (batch, 4 hidden) and c (batch, hidden) -> the
        new (h, c)."""
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
        if self.token_dim:
            raise ValueError("a StepRecurrent without its token columns runs step by step")
        outputs = []
        for t in range(x.size(1)):
            out, state = self.step(x[:, t], state)
            outputs.append(out)
        return torch.stack(outputs, dim=1), state


# The most a decoder's `TokenProducts` table holds: 512 pieces of the reference model
# (rows of 2,560 fp32 values), 87 % of the rows of a beam-5 search over Multi30k test_2016
# (1,024 pieces: 94 %). Beam 5 over test_2016, fp32, in one process against the full
# products: 1.027x with this cap (peak RSS of `rnmt translate` 372 -> 374 MB), 1.048x
# with 10 MB (-> 392 MB), 1.05-1.08x with the whole vocabulary's 40 MB.
TOKEN_TABLE_BYTES = 5 << 20


class TokenProducts:
    """The previous piece's share of a decoder step's products, looked up by piece id.

    An attentive decoder multiplies E y_{t-1} (batch, emb) into its RNN's input product,
    and Bahdanau's deep output once more: W_e E y_{t-1} for each such column block W_e
    (out_i, emb). It depends on the piece alone, so for the most frequent pieces (ids are
    in frequency order: `rnmt.vocab`) it is a row of a table computed once at loading,
    and the step multiplies the other columns only; rarer pieces get the product, for
    their rows alone. The table's size is capped (`TOKEN_TABLE_BYTES`): a row is ten
    times the embedding's, and translation's memory is a target of its own.

        table[y] = E[y] [W_1; W_2; …]ᵀ          (rows, Σ out_i), fp32

    Shapes: ids (batch,) -> one (batch, out_i) part per weight, fp32.
    """

    def __init__(self, embedding: Tensor, weights: list[Tensor], max_bytes: int | None = None
                 ) -> None:
        max_bytes = TOKEN_TABLE_BYTES if max_bytes is None else max_bytes
        self.sizes = [w.size(0) for w in weights]
        self.embedding = embedding.detach()
        self.weight_t = torch.cat(weights).detach().t().contiguous()  # (emb, Σ out)
        rows = max(1, min(self.embedding.size(0), max_bytes // (4 * sum(self.sizes))))
        self.table = self.embedding[:rows] @ self.weight_t

    def __call__(self, ids: Tensor) -> list[Tensor]:
        rows = self.table.size(0)
        parts = self.table.index_select(0, ids.clamp(max=rows - 1))
        if rows < self.embedding.size(0):
            rare = (ids >= rows).nonzero().squeeze(1)
            if rare.numel():
                parts.index_copy_(0, rare, self.embedding[ids[rare]] @ self.weight_t)
        return list(parts.split(self.sizes, dim=-1))


def _look_up_tokens(decoder: nn.Module, linear: LinearFactory) -> None:
    """An attentive decoder with an LSTM or tanh RNN: its step products without the
    columns of E y_{t-1}, whose share comes from a `TokenProducts` (`decoder.token_products`:
    the RNN's part, then Bahdanau's deep output's: o_t = tanh(W_o [s_t; c_t; E y_{t-1}]),
    the embedding's columns last)."""
    emb_dim = decoder.embed.embedding_dim
    rnn: RNN = decoder.rnn
    weights = [rnn.layer.weight_ih_l0[:, :emb_dim]]
    decoder.rnn = StepRecurrent(rnn, linear, token_dim=emb_dim)
    if decoder.bahdanau:
        weight, bias = decoder.output.weight, decoder.output.bias
        weights.append(weight[:, -emb_dim:])
        decoder.output = linear(weight[:, :-emb_dim], bias)
    decoder.token_products = TokenProducts(decoder.embed.weight, weights)


def _swap_linear(parent: nn.Module, name: str, linear: LinearFactory) -> None:
    """parent.name = linear(weight, bias) when parent.name is an nn.Linear."""
    layer = getattr(parent, name, None)
    if isinstance(layer, nn.Linear):
        setattr(parent, name, linear(layer.weight, layer.bias))


@torch.no_grad()
def swap_step_layers(model: nn.Module, linear: LinearFactory, look_up_tokens: bool = False
                     ) -> nn.Module:
    """Swap the per-step layers of a loaded fp32 CPU model (Seq2Seq, LanguageModel or an
    Ensemble of them) for ones built by `linear`, in place, and return it, in eval mode.
    `look_up_tokens`: an attentive decoder with an LSTM or tanh RNN takes the previous
    piece's share of its products from a table (`TokenProducts`).

    A tied output projection (Press & Wolf) is swapped as the generator only: the
    embedding it shares its matrix with stays as it is.
    """
    members = getattr(model, "members", None)
    for member in members if members is not None else [model]:
        decoder = getattr(member, "decoder", member)  # a language model is its own decoder
        if (look_up_tokens and hasattr(decoder, "token_products")
                and isinstance(decoder.rnn, RNN) and decoder.rnn.cell != "gru"):
            _look_up_tokens(decoder, linear)
        elif isinstance(decoder.rnn, RNN):
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
    # The token table pays in fp32 only: next to bf16 products, its rare pieces' fp32
    # product cost more than it saved (0.95x; int8 1.00x with a full table).
    return swap_step_layers(model, functools.partial(OneDNNLinear, dtype=dtype),
                            look_up_tokens=dtype == torch.float32)
