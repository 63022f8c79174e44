"""Which reduced float precisions a device runs, and runs well (training and translation)."""

from __future__ import annotations

import functools

import torch

from rnmt.errors import ConfigError

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision_name(precision: str) -> None:
    """A ConfigError for a name `--precision` does not know."""
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown --precision {precision!r}; choose from "
                          f"{', '.join(PRECISIONS)}")


def cpu_training_products(x: torch.Tensor) -> torch.dtype | None:
    """The dtype the CPU training kernels (`rnmt.nn.rnn.Stepper`,
    `rnmt.nn.loss.VocabularyLoss`, `rnmt.nn.attention.AttentionSteps`) multiply in for a
    pass over x, or None where they step aside for the plain ops:

    - fp32: x fp32 on the CPU, autograd on, no autocast (`--precision fp32`);
    - bf16: the same under CPU autocast to bf16 (`--precision bf16`) on a CPU with bf16
      matrix units: the kernels' matrix products take bf16 operands (fp32 accumulation),
      everything else in them (gates, softmax, the loss, the recurrent state) stays fp32;
    - None: a GPU, no autograd, fp16 autocast, bf16 emulated in software.
    """
    if x.device.type != "cpu" or not x.is_floating_point() or not torch.is_grad_enabled():
        return None
    autocast = _cpu_autocast_dtype()
    if autocast is None:
        return torch.float32 if x.dtype == torch.float32 else None
    if autocast == torch.bfloat16 and cpu_has_bf16_units():
        return torch.bfloat16
    return None


def cpu_autocast_off() -> torch.autocast:
    """CPU autocast switched off, around the CPU kernels that choose each product's dtype
    themselves (autocast would recast their fp32 work, a bmm say, to bf16)."""
    return torch.autocast("cpu", enabled=False)


def _cpu_autocast_dtype() -> torch.dtype | None:
    """The dtype CPU autocast casts to, None when it is off."""
    try:
        on, dtype = torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")
    except (TypeError, AttributeError):  # torch < 2.4
        on, dtype = torch.is_autocast_cpu_enabled(), torch.get_autocast_cpu_dtype()
    return dtype if on else None


@functools.cache
def cpu_has_bf16_units() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (AMX tiles or AVX512-BF16);
    elsewhere torch emulates bf16 GEMMs, slower than fp32."""
    probes = [getattr(torch.cpu, name, None)
              for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    return any(probe() for probe in probes if probe is not None)


def check_precision(precision: str, device: torch.device) -> str | None:
    """Refuse a precision the device cannot run (ConfigError); return a warning when it
    runs but slowly: bf16 on a CPU without bf16 matrix units."""
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError(f"--precision fp16 needs a CUDA device (here: {device.type}); "
                          "use bf16 or fp32")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"--precision bf16: {torch.cuda.get_device_name(device)} has no "
                          "bfloat16 support; use fp16 or fp32")
    if precision == "bf16" and device.type == "cpu" and not cpu_has_bf16_units():
        return (f"--precision bf16 on a CPU without AMX or AVX512-BF16 (this one: "
                f"{torch.backends.cpu.get_cpu_capability()}) is emulated and slower than fp32")
    return None
