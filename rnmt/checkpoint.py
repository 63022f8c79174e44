"""Checkpoints: one self-contained file, written atomically, loaded without running code.

A checkpoint is a dict of tensors and plain values only:

    format: "rnmt", version: FORMAT_VERSION
    model_config: dict                     (ModelConfig.to_dict())
    model: state dict of tensors
    src_vocab, tgt_vocab: {"spm_proto": bytes, "pieces": [str, ...]}
    train_config, training: run state (optimizer, step, RNG, sampler), optional

so `torch.load(..., weights_only=True)` reads it: a crafted pickle cannot execute anything.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from rnmt.errors import CheckpointError

FORMAT = "rnmt"
FORMAT_VERSION = 1


def save_checkpoint(payload: dict[str, Any], path: str | Path) -> None:
    """Write to a temporary file beside `path`, flush it to disk, then rename over `path`.

    A crash at any moment leaves either the old file or the new one, never a torn one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save({"format": FORMAT, "version": FORMAT_VERSION, **payload}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"{path}: cannot save checkpoint ({err.strerror or err})") from None


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load and validate a checkpoint; any problem is one `CheckpointError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"{path}: not an rnmt checkpoint (it holds objects beyond tensors and plain "
            "values, which are never unpickled)"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, KeyError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({first_line})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an rnmt checkpoint")
    if payload.get("version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {payload.get('version')} is not supported "
            f"(this rnmt reads version {FORMAT_VERSION})"
        )
    for key in ("model_config", "model", "src_vocab", "tgt_vocab"):
        if key not in payload:
            raise CheckpointError(f"{path}: incomplete checkpoint (no {key!r})")
    return payload
