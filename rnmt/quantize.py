"""Int8 inference on the CPU: int8 weights for the decoder's step loop, fp32 everything else.

A quantised linear layer keeps each output row j of W as int8 numbers q_w with one scale
s_j (symmetric, per output channel), and quantises its input x on the fly, per call, to
uint8 with one scale s_x and zero point z_x over the whole tensor (dynamic quantisation):

    W_j ≈ s_j q_w,j            q_w ∈ [-127, 127],   s_j = max_k |W_jk| / 127
    x   ≈ s_x (q_x - z_x)      q_x ∈ [0, 127]       (7 bits: `reduce_range`, see below)
    y_j = s_x s_j Σ_k (q_x - z_x)_k q_w,jk + b_j     int32 accumulation, fp32 bias

`quantize_for_inference(model)` swaps, in a loaded model, the layers that run once per
decoder step and beam row for `Int8Linear` ones (`rnmt.step_layers.swap_step_layers`: the
decoder RNN's gate products, the attention's query projection W_q, the deep-output / Luong
output layer, and the vocabulary projection). The gate non-linearities, attention scores,
softmaxes and the encoder stay fp32. Checkpoints are never quantised: this happens
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
from rnmt.step_layers import swap_step_layers

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


def quantize_for_inference(model: nn.Module) -> nn.Module:
    """Swap the per-step layers of a loaded fp32 CPU model (Seq2Seq, LanguageModel or an
    Ensemble of them) for int8 ones (`rnmt.step_layers.swap_step_layers`), in place, and
    return it, in eval mode. The model's state dict no longer describes the quantised
    layers: save the fp32 model, quantise after loading.
    """
    select_engine()  # a torch without int8 kernels fails here, before anything is swapped
    return swap_step_layers(model, Int8Linear)
