"""Int8 inference on the CPU: int8 weights for the decoder's step loop, fp32 everything else.

A quantised linear layer keeps each output row j of W as int8 numbers q_w with one scale
s_j (symmetric, per output channel), and quantises its input x on the fly, per call, to
uint8 with one scale s_x and zero point z_x over the whole tensor (dynamic quantisation):

    W_j ≈ s_j q_w,j            q_w ∈ [-127, 127],   s_j = max_k |W_jk| / 127
    x   ≈ s_x (q_x - z_x)      q_x ∈ [0, 127]       (7 bits: `reduce_range`, see below)
    y_j = s_x s_j Σ_k (q_x - z_x)_k q_w,jk + b_j     int32 accumulation, fp32 bias

`quantize_for_inference(model)` swaps, in a loaded model, the layers that run once per
decoder step and beam row: the decoder RNN (`Int8Recurrent`, same `step(x, state)` as
`rnmt.nn.rnn.RNN`), the attention's query projection W_q, the deep-output / Luong output
layer, and the vocabulary projection (`Int8Linear`). The gate non-linearities, attention
scores, softmaxes and the encoder stay fp32. Checkpoints are never quantised: this happens
after loading, so one file serves fp32, bf16 and int8 translation.

Why our own module on `torch.ops.quantized.linear_prepack` / `linear_dynamic` (fbgemm's
x86 kernels, QNNPACK on ARM) and not torchao or `torch.ao.quantization.quantize_dynamic`:
measured on the development machine (AMD EPYC, AVX2 only, 2 threads, torch 2.13 CPU),

    320×768 @ 768×2048          fp32 F.linear 9.2 ms    quantized.linear_dynamic 4.9 ms
    320×512 @ 512×8000          fp32 33.8 ms            quantized.linear_dynamic 10.6 ms
    torch._int_mm (torchao's eager int8 path)   615 ms vs fp32 12 ms: 50× slower
    aten._weight_int8pack_mm (int8 weight, fp32 activations): no faster than fp32
    bf16 GEMM: 5× slower than fp32 (no AMX / avx512-bf16 on that CPU)

so the fbgemm kernels are the only int8 path that pays on a CPU without AMX, and
`quantize_dynamic`, the old front end to the same kernels, is deprecated. End to end
(Multi30k test, reference model, beam 5): 1.67× fp32's speed on that machine, 1.57× on a
Xeon with AMX, BLEU 24.68 against 24.76 (`benchmarks/translate_speed.py`). (So is creating
quantised tensors, which `linear_prepack` still needs: that warning is silenced at packing
time, and a torch without these ops gets a clear error instead of a crash.)

`reduce_range=True` quantises activations to 7 bits: fbgemm's AVX2 kernel adds pairs of
uint8×int8 products in int16 (`vpmaddubsw`), and 2·255·127 would overflow it.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from rnmt.errors import ConfigError
from rnmt.nn.rnn import RNN, State, step_stack

QUANTIZATIONS = ("none", "int8")
# fbgemm's x86 kernels first ("x86" is the engine that picks fbgemm or oneDNN per shape),
# QNNPACK on ARM.
ENGINES = ("x86", "fbgemm", "qnnpack")


def select_engine() -> str:
    """Set torch's quantised engine to the best one this build supports and return it.

    torch dispatches `linear_prepack` on a process-wide engine setting; it is only changed
    when the current one is not among ours (the default build on x86 already uses "x86").
    Cheap (a look at torch's settings), so every `Int8Linear` asks for it before packing,
    and `quantize_for_inference` once more up front, to fail before swapping anything.
    """
    supported = list(torch.backends.quantized.supported_engines)
    usable = [e for e in ENGINES if e in supported]
    if not usable or not hasattr(torch.ops.quantized, "linear_dynamic"):
        raise ConfigError(
            "--quantize int8 needs torch's fbgemm (x86) or qnnpack (ARM) int8 kernels, "
            f"which this torch build lacks (engines: {', '.join(supported) or 'none'})"
        )
    if torch.backends.quantized.engine not in usable:
        torch.backends.quantized.engine = usable[0]
    return torch.backends.quantized.engine


def check_quantize(quantize: str, device: torch.device | str) -> None:
    """int8 runs on the CPU only: on a GPU, bf16/fp16 (`--precision`) is the fast path.
    `device` may be a name ("cuda:1"): the check needs no GPU."""
    if quantize not in QUANTIZATIONS:
        raise ConfigError(f"unknown --quantize {quantize!r}; choose from "
                          f"{', '.join(QUANTIZATIONS)}")
    if quantize == "int8" and not str(device).startswith("cpu"):
        raise ConfigError(f"--quantize int8 runs on the CPU only (device {device}); on a "
                          "GPU use --precision bf16 or fp16")


class Int8Linear(nn.Module):
    """y = x Wᵀ + b with int8 weights (per-output-channel scales) and int8 activations
    quantised per call; fp32 in, fp32 out. Shapes: x (..., in_features) -> (..., out_features).

    Built from an fp32 weight (out_features, in_features) and bias, packed once for the
    kernel (under the engine `select_engine` picks); the module holds no fp32 copy of the
    weight.
    """

    def __init__(self, weight: Tensor, bias: Tensor | None = None) -> None:
        super().__init__()
        select_engine()
        w = weight.detach().float().cpu().contiguous()
        self.out_features, self.in_features = w.shape
        scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12).double()
        zero_points = torch.zeros(self.out_features, dtype=torch.long)
        b = None if bias is None else bias.detach().float().cpu().contiguous()
        with warnings.catch_warnings():
            # torch 2.13 deprecates creating quantised tensors; linear_prepack still takes one.
            warnings.simplefilter("ignore", UserWarning)
            q = torch.quantize_per_channel(w, scales, zero_points, 0, torch.qint8)
            self._packed = torch.ops.quantized.linear_prepack(q, b)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        return cls(linear.weight, linear.bias)

    def dequantized_weight(self) -> Tensor:
        """s_j q_w,j: the weight the kernel multiplies by, in fp32 (for tests and checks)."""
        weight, _ = torch.ops.quantized.linear_unpack(self._packed)
        return weight.dequantize()

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, self.in_features)
        if flat.dtype != torch.float32:
            flat = flat.float()
        y = torch.ops.quantized.linear_dynamic(flat.contiguous(), self._packed, True)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


class Int8Recurrent(nn.Module):
    """A unidirectional RNN/LSTM/GRU stack for inference with int8 gate matrix products and
    fp32 gate arithmetic; torch's gate layout (LSTM i, f, g, o; GRU r, z, n).

        LSTM, tanh RNN:  a_t = [W_ih W_hh] [x_t; h_{t-1}] + (b_ih + b_hh)   one int8 GEMM
        GRU:             a_t = W_ih x_t + b_ih,  b_t = W_hh h_{t-1} + b_hh  two (r ⊙ b_n)

    then, LSTM:  i, f, o = σ(a_i), σ(a_f), σ(a_o);  g = tanh(a_g)
                 c_t = f ⊙ c_{t-1} + i ⊙ g;   h_t = o ⊙ tanh(c_t)
         GRU:    r, z = σ(a_r + b_r), σ(a_z + b_z);  n = tanh(a_n + r ⊙ b_n)
                 h_t = (1 - z) ⊙ n + z ⊙ h_{t-1}
         RNN:    h_t = tanh(a_t)

    Shapes as `RNN.step`: x (batch, input) -> (batch, hidden); state (layers, batch,
    hidden), a pair (h, c) for an LSTM.
    """

    def __init__(self, rnn: RNN) -> None:
        super().__init__()
        if rnn.directions != 1:
            raise ValueError("Int8Recurrent steps a unidirectional stack")
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
                self.gemms.append(nn.ModuleList([Int8Linear(w_ih, b_ih), Int8Linear(w_hh, b_hh)]))
            else:
                bias = None if b_ih is None else b_ih + b_hh
                self.gemms.append(Int8Linear(torch.cat([w_ih, w_hh], dim=1), bias))

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
        gates = self.gemms[k](torch.cat([x, h], dim=-1))
        H = self.hidden_size
        # In place on the fresh GEMM output: i and f are adjacent, so one sigmoid call.
        gates[:, : 2 * H].sigmoid_()
        gates[:, 3 * H :].sigmoid_()
        i, f, g, o = gates.chunk(4, dim=-1)
        c = torch.addcmul(f * c, i, g.tanh_())
        return o * torch.tanh(c), c

    def _gru(self, k: int, x: Tensor, h: Tensor) -> Tensor:
        input_part, hidden_part = self.gemms[k]
        a, b = input_part(x), hidden_part(h)
        H = self.hidden_size
        rz = torch.sigmoid(a[:, : 2 * H] + b[:, : 2 * H])
        r, z = rz.chunk(2, dim=-1)
        n = torch.tanh(torch.addcmul(a[:, 2 * H :], r, b[:, 2 * H :]))
        return torch.lerp(n, h, z)  # (1 - z) ⊙ n + z ⊙ h

    def forward(self, x: Tensor, lengths: Tensor | None, state: State
                ) -> tuple[Tensor, State]:
        """Whole sequences, step by step (teacher forcing through a quantised decoder).
        Shapes: x (batch, seq, input) -> (batch, seq, hidden). Rows are not padded inside
        the recurrence (`lengths` must be None): a decoder's padding sits after its last
        real position, which no earlier output depends on. `state` is required: decoders
        start from the bridge's state, a language model from its zeros (`init_state`)."""
        if lengths is not None:
            raise ValueError("Int8Recurrent runs decoders: whole rows, no lengths")
        outputs = []
        for t in range(x.size(1)):
            out, state = self.step(x[:, t], state)
            outputs.append(out)
        return torch.stack(outputs, dim=1), state


def _swap_linear(parent: nn.Module, name: str) -> None:
    """parent.name = Int8Linear(parent.name) when it is an nn.Linear."""
    layer = getattr(parent, name, None)
    if isinstance(layer, nn.Linear):
        setattr(parent, name, Int8Linear.from_linear(layer))


@torch.no_grad()
def quantize_for_inference(model: nn.Module) -> nn.Module:
    """Swap the per-step layers of a loaded fp32 CPU model (Seq2Seq, LanguageModel or an
    Ensemble of them) for int8 ones, in place, and return it, in eval mode.

    A tied output projection (Press & Wolf) is quantised as the generator only: the
    embedding it shares its matrix with stays fp32. The model's state dict no longer
    describes the quantised layers: save the fp32 model, quantise after loading.
    """
    select_engine()  # a torch without int8 kernels fails here, before anything is swapped
    members = getattr(model, "members", None)
    for member in members if members is not None else [model]:
        decoder = getattr(member, "decoder", member)  # a language model is its own decoder
        if isinstance(decoder.rnn, RNN):
            decoder.rnn = Int8Recurrent(decoder.rnn)
        _swap_linear(decoder, "output")
        attention = getattr(decoder, "attention", None)
        if attention is not None:
            _swap_linear(attention, "query_proj")
        _swap_linear(member, "projection")
        _swap_linear(member, "generator")
    return model.eval()
