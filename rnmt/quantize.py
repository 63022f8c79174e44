"""Int8 inference on the CPU: int8 weights for the decoder's step loop, fp32 everything else.

A quantised linear layer keeps each output row j of W as int8 numbers q_w with one scale
s_j (symmetric, per output channel), and quantises its input x on the fly, per call, to
uint8 with one scale s_x and zero point z_x over the whole tensor (dynamic quantisation):

    W_j ≈ s_j q_w,j            q_w ∈ [-127, 127],   s_j = max_k |W_jk| / 127
    x   ≈ s_x (q_x - z_x)      q_x ∈ [0, 255] (oneDNN), [0, 127] (fbgemm: `reduce_range`)
    y_j = s_x s_j Σ_k (q_x - z_x)_k q_w,jk + b_j     int32 accumulation, fp32 bias

`quantize_for_inference(model)` swaps, in a loaded model, the layers that run once per
decoder step and beam row for `Int8Linear` ones (`rnmt.step_layers.swap_step_layers`: the
decoder RNN's gate products, the attention's query projection W_q, the deep-output / Luong
output layer, and the vocabulary projection). The gate non-linearities, attention scores,
softmaxes and the encoder stay fp32. Checkpoints are never quantised: this happens
after loading, so one file serves fp32, bf16 and int8 translation.

Why our own module, on torch's int8 ops, and not torchao or
`torch.ao.quantization.quantize_dynamic` (deprecated, and a front end to the fbgemm ops
below): two kernels, chosen per CPU (`Int8Linear`).

- On a CPU with AMX (its int8 matrix unit): oneDNN's `onednn::qlinear_pointwise`, the
  op torch.compile's x86 int8 path lowers to, with the input quantised by our own torch
  ops (`quantize_activation`) and an fp32 result. Measured on the AMX development machine
  (Intel Xeon, 2 threads, torch 2.13 CPU), ms per product of 320 rows:

      320×1280 @ 1280×2048   fbgemm 1.81   oneDNN int8 0.91 (0.63 product + 0.19 quantising x)
      320×512 @ 512×3964     fbgemm 1.37   oneDNN int8 0.74 (0.60 + 0.08)
      (bf16 on oneDNN: 0.72 and 0.59; fp32: 4.64 and 3.79)

  End to end (Multi30k test_2016, reference model, beam 5, one process, runs alternating):
  1.14–1.19× the fbgemm path's speed, BLEU 37.31 against 37.25 (fp32 37.27).
- Elsewhere: `torch.ops.quantized.linear_prepack` / `linear_dynamic` (fbgemm's x86
  kernels, QNNPACK on ARM). Measured on the first development machine (AMD EPYC, AVX2
  only, 2 threads):

      320×768 @ 768×2048          fp32 F.linear 9.2 ms    quantized.linear_dynamic 4.9 ms
      320×512 @ 512×8000          fp32 33.8 ms            quantized.linear_dynamic 10.6 ms
      torch._int_mm (torchao's eager int8 path)   615 ms vs fp32 12 ms: 50× slower
      aten._weight_int8pack_mm (int8 weight, fp32 activations): no faster than fp32
      bf16 GEMM: 5× slower than fp32 (no AMX / avx512-bf16 on that CPU)

  so fbgemm's are the only int8 kernels that pay on a CPU without AMX. End to end: 1.67×
  fp32's speed on that machine, BLEU 24.68 against 24.76. Creating the quantised weight
  tensor `linear_prepack` needs is deprecated in torch 2.13: that warning is silenced at
  packing time, and a torch without these ops gets a clear error instead of a crash.
  `reduce_range=True` quantises activations to 7 bits: fbgemm's AVX2 kernel adds pairs of
  uint8×int8 products in int16 (`vpmaddubsw`), and 2·255·127 would overflow it.
"""

from __future__ import annotations

import functools
import math
import warnings

import torch
from torch import Tensor, nn

from rnmt.errors import ConfigError
from rnmt.nn.onednn import pad_rows, row_bucket
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


def onednn_int8_runs() -> bool:
    """Whether `Int8Linear` multiplies on oneDNN here: a CPU with AMX tiles (its int8 matrix
    unit), oneDNN switched on (`torch.backends.mkldnn.enabled`), and oneDNN's int8 ops in
    this torch build, giving the right answer. Elsewhere fbgemm (`select_engine`)."""
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    if amx is None or not amx() or not torch.backends.mkldnn.enabled:
        return False
    return _onednn_int8_available()


@functools.cache
def _onednn_int8_available() -> bool:
    """Whether this torch build has oneDNN's int8 linear ops and they give the right answer
    (here, on the ops themselves: `Int8Linear`'s own use of them is what the tests check)."""
    try:
        # Exact: small integers, scales 1, zero point 3, sums far below 2^24.
        weight = torch.arange(-6, 6, dtype=torch.int8).view(3, 4)
        x = torch.tensor([[3, 4, 5, 6], [6, 5, 4, 3]], dtype=torch.uint8)
        y = torch.ops.onednn.qlinear_pointwise(
            x, 1.0, 3, torch.ops.onednn.qlinear_prepack(weight, None), torch.ones(3),
            torch.zeros(3, dtype=torch.long), None, 1.0, 0, torch.float32, "none", [], "")
        return torch.equal(y, (x.float() - 3) @ weight.float().t())
    except (AttributeError, RuntimeError):  # ops missing from this build or refused
        return False


def quantize_activation(x: Tensor, rows: int) -> tuple[Tensor, float, int]:
    """x (n, in) fp32 -> (q, s_x, z_x): q (rows, in) uint8, its first n rows x quantised,
    x ≈ s_x (q − z_x), one scale and zero point over the whole tensor, its range [min, max]
    widened to hold 0 (so that 0, the padding of every attention and gate input, is exact);
    rows n..rows−1 are 0 (`pad_rows`: the kernel's shape, `row_bucket`; never read back).

    In plain torch ops, not `torch.quantize_per_tensor_dynamic`: quantised tensors are
    deprecated (torch 2.13). Three passes over x: its range, x/s_x + z_x + ½ (one `add`),
    and the uint8 cast, which truncates: round half up, since the values are ≥ 0 there.
    The range maps onto 254.9 steps, not 255, so that no value needs clamping: x/s_x + z_x
    lies within ½ of [0, 254.9] (z_x is rounded), so the cast only sees [−ε, 255.9]. Three
    passes instead of five (a `clamp_` and a separate multiply): 217 against 289 µs for a
    320 × 1280 input, 37 against 58 for 40 × 1280."""
    lo_t, hi_t = torch.aminmax(x)
    lo, hi = min(lo_t.item(), 0.0), max(hi_t.item(), 0.0)
    if not math.isfinite(hi - lo):  # inf/NaN in x: any finite scale; NaN flows to the output
        lo, hi = -1.0, 1.0
    scale = max(hi - lo, 1e-12) / 254.9
    zero_point = round(-lo / scale)
    y = torch.add(torch.tensor(zero_point + 0.5), x, alpha=1.0 / scale)
    return pad_rows(y, torch.uint8, rows), scale, zero_point  # the cast is pad_rows' copy


class Int8Linear(nn.Module):
    """y = x Wᵀ + b with int8 weights (per-output-channel scales) and int8 activations
    quantised per call; fp32 in, fp32 out. Shapes: x (..., in_features) -> (..., out_features).

    Built from an fp32 weight (out_features, in_features) and bias, packed once for the
    kernel; the module holds no fp32 copy of the weight. Two kernels (`backend`; by default
    `onednn_int8_runs` chooses):

    - "onednn": `torch.ops.onednn.qlinear_pointwise`, uint8 × int8 on AMX, fp32 out with
      the bias added to the fp32 sums; activations quantised by `quantize_activation`, over
      8 bits, and padded to `row_bucket` rows as `OneDNNLinear` (a kernel per row count
      otherwise). Beam 5 over Multi30k test_2016 on the AMX machine, reference model, one
      process, runs alternating: 1.14–1.19× fbgemm's speed, and 1.023× more since
      `quantize_activation` takes three passes; BLEU 37.38 against 37.25 (fp32: 37.27);
    - "fbgemm": `torch.ops.quantized.linear_dynamic` (fbgemm on x86, QNNPACK on ARM, under
      the engine `select_engine` picks), activations over 7 bits (`reduce_range`).
    """

    def __init__(self, weight: Tensor, bias: Tensor | None = None,
                 backend: str | None = None) -> None:
        super().__init__()
        if backend is None:
            backend = "onednn" if onednn_int8_runs() else "fbgemm"
        if backend not in ("onednn", "fbgemm"):
            raise ValueError(f"unknown int8 backend {backend!r}")
        self.backend = backend
        w = weight.detach().float().cpu().contiguous()
        self.out_features, self.in_features = w.shape
        scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
        b = None if bias is None else bias.detach().float().cpu().contiguous()
        if backend == "onednn":
            q = torch.round(w / scales.unsqueeze(1)).clamp_(-127, 127).to(torch.int8)
            self._packed = torch.ops.onednn.qlinear_prepack(q, None)  # in oneDNN's layout
            self._scales = scales
            self._zero_points = torch.zeros(self.out_features, dtype=torch.long)
            self._bias = b
            return
        select_engine()
        zero_points = torch.zeros(self.out_features, dtype=torch.long)
        with warnings.catch_warnings():
            # torch 2.13 deprecates creating quantised tensors; linear_prepack still takes one.
            warnings.simplefilter("ignore", UserWarning)
            q = torch.quantize_per_channel(w, scales.double(), zero_points, 0, torch.qint8)
            self._packed = torch.ops.quantized.linear_prepack(q, b)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        return cls(linear.weight, linear.bias)

    def dequantized_weight(self) -> Tensor:
        """s_j q_w,j: the weight the kernel multiplies by, in fp32 (for tests and checks)."""
        if self.backend == "onednn":  # the packed weight reads back as q_wᵀ
            return self._packed.to_dense().t().float() * self._scales.unsqueeze(1)
        weight, _ = torch.ops.quantized.linear_unpack(self._packed)
        return weight.dequantize()

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, self.in_features)
        if flat.dtype != torch.float32:
            flat = flat.float()
        if self.backend == "fbgemm":
            y = torch.ops.quantized.linear_dynamic(flat.contiguous(), self._packed, True)
            return y.view(*x.shape[:-1], self.out_features)
        rows = flat.size(0)
        if rows == 0:  # no range to quantise over, and nothing to compute
            return flat.new_zeros(*x.shape[:-1], self.out_features)
        q, scale, zero_point = quantize_activation(flat, row_bucket(rows))
        y = torch.ops.onednn.qlinear_pointwise(
            q, scale, zero_point, self._packed, self._scales, self._zero_points, self._bias,
            1.0, 0, torch.float32, "none", [], "")
        return y[:rows].view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"int8 ({self.backend})")


def quantize_for_inference(model: nn.Module) -> nn.Module:
    """Swap the per-step layers of a loaded fp32 CPU model (Seq2Seq, LanguageModel or an
    Ensemble of them) for int8 ones (`rnmt.step_layers.swap_step_layers`), in place, and
    return it, in eval mode. The model's state dict no longer describes the quantised
    layers: save the fp32 model, quantise after loading.
    """
    if not onednn_int8_runs():
        select_engine()  # a torch without int8 kernels fails here, before anything is swapped
    return swap_step_layers(model, Int8Linear)
