"""Where a command runs: the device named by `--device`, and the `--threads` it may use."""

from __future__ import annotations

import torch

from rnmt.errors import ConfigError


def resolve_device(name: str) -> torch.device:
    """`auto` = CUDA when present, else CPU; a device named must exist on this machine."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name}: unknown device; choose auto, cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine")
    return device


# libgomp aborts the process (no exception) when it cannot allocate a pool of threads
# this large; sentencepiece refuses more than 1024 too.
MAX_THREADS = 1024


def check_threads(threads: int | None) -> None:
    """A ConfigError for a `--threads` outside [0, MAX_THREADS] (0 or None: torch's default)."""
    if threads is not None and not 0 <= threads <= MAX_THREADS:
        raise ConfigError(f"--threads must be between 0 (torch's default) and {MAX_THREADS}, "
                          f"not {threads}")
