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

import contextlib
import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import torch

from rnmt.errors import CheckpointError
from rnmt.text import same_file

FORMAT = "rnmt"
FORMAT_VERSION = 1


def save_checkpoint(payload: dict[str, Any], path: str | Path) -> None:
    """Write to a temporary file beside `path`, flush it to disk, then rename over `path`.

    A crash at any moment leaves either the old file or the new one, never a torn one.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)  # a file in the way: FileExistsError
        _remove_stale_temporaries(path)
        with open(tmp, "wb") as f:
            torch.save({"format": FORMAT, "version": FORMAT_VERSION, **payload}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:
        # torch.save's zip writer reports a failed write (a full disk) as a RuntimeError
        # ("unexpected pos …"); the temporary file is removed either way.
        with contextlib.suppress(OSError):  # no directory to hold it: nothing to remove
            tmp.unlink(missing_ok=True)
        if isinstance(err, OSError):
            where = f": {err.filename}" if err.filename and str(err.filename) != str(tmp) else ""
            reason = f"{err.strerror or err}{where}"
        else:
            reason = (str(err).splitlines() or [""])[0]
            with contextlib.suppress(OSError):
                if shutil.disk_usage(path.parent).free < 2**20:
                    reason = "No space left on device"
        raise CheckpointError(f"{path}: cannot save checkpoint ({reason})") from None


def _remove_stale_temporaries(path: Path) -> None:
    """Delete `.NAME.tmpPID` files left by writers of `path` killed mid-save (kill -9, OOM
    killer): their process is gone, so the file can never be completed. A live writer's
    file is left alone."""
    prefix = f".{path.name}.tmp"
    for tmp in path.parent.iterdir():
        pid = tmp.name[len(prefix):]
        if tmp.name.startswith(prefix) and pid.isdigit() and not _process_alive(int(pid)):
            tmp.unlink(missing_ok=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, owned by someone else
    return True


def load_checkpoint(path: str | Path, mmap: bool = False) -> dict[str, Any]:
    """Load and validate a checkpoint; any problem is one `CheckpointError` naming the file.
    `mmap`: tensors read from the file's pages as they are used, not copied in first."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"{path}: not an rnmt checkpoint (it holds objects beyond tensors and plain "
            "values, which are never unpickled)"
        ) from None
    except Exception as err:  # noqa: BLE001 - the file is untrusted input: bytes at random
        # reach the unpickler's every corner (IndexError from an empty stack, 8 % of random
        # 2 kB files), and each must be this one line, never a traceback.
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


def latest_checkpoints(directory: str | Path, n: int) -> list[Path]:
    """The `n` checkpoints (`*.pt`) of `directory` with the highest stored "step", oldest
    first. Files holding the same step (e.g. best.pt and last.pt saved together) count once.
    An average written there earlier is passed over: it holds the step of its newest input,
    and would stand in for that checkpoint."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no such directory")
    by_step: dict[int, Path] = {}
    for path in sorted(directory.glob("*.pt")):
        payload = load_checkpoint(path, mmap=True)
        if "averaged_from" in payload:
            continue
        step = payload.get("step")
        if not isinstance(step, int):
            raise CheckpointError(f"{path}: checkpoint stores no training step")
        by_step.setdefault(step, path)
    if len(by_step) < n:
        raise CheckpointError(
            f"{directory}: {n} checkpoints of distinct steps asked for, {len(by_step)} found"
        )
    return [by_step[s] for s in sorted(by_step)[-n:]]


def check_average_output(paths: list[Path], output: Path) -> None:
    """Refuse an `average` output that would destroy work: one of the checkpoints being
    averaged, or a run's resumable checkpoint (its `last.pt`: the average holds no training
    state, so `--resume` could not continue). A CheckpointError before anything is written."""
    output = Path(output)
    if not output.exists():
        return
    # a missing input is no match: averaging reports it, naming the file
    if any(same_file(output, path) for path in paths):
        raise CheckpointError(f"{output}: is one of the checkpoints being averaged; "
                              "write the average to another file")
    try:
        resumable = "training" in load_checkpoint(output, mmap=True)
    except CheckpointError:
        return  # not a checkpoint of ours: nothing resumable is lost
    if resumable:
        raise CheckpointError(f"{output}: holds a run's training state (--resume continues "
                              "from it); write the average to another file")


def average_checkpoints(paths: list[str | Path]) -> dict[str, Any]:
    """θ_avg = (1/N) Σ_i θ_i over the float parameters of N checkpoints of one model
    (fairseq's average_checkpoints); the result is an ordinary checkpoint payload without
    training state. Models and vocabularies must match, or it is a CheckpointError."""
    if not paths:
        raise CheckpointError("no checkpoints to average")
    first = load_checkpoint(paths[0])
    sums = {k: v.double() if v.is_floating_point() else v.clone()
            for k, v in first["model"].items()}
    steps = [first.get("step")]
    for path in paths[1:]:
        payload = load_checkpoint(path)
        for key in ("model_config", "src_vocab", "tgt_vocab"):
            if payload[key] != first[key]:
                raise CheckpointError(f"{path}: its {key} differs from {paths[0]}'s; "
                                      "only checkpoints of one model can be averaged")
        if payload["model"].keys() != sums.keys():
            raise CheckpointError(f"{path}: its parameters differ from {paths[0]}'s")
        for k, v in payload["model"].items():
            if v.shape != sums[k].shape:
                raise CheckpointError(f"{path}: parameter {k} has shape {tuple(v.shape)}, "
                                      f"not {tuple(sums[k].shape)}")
            if v.is_floating_point():
                sums[k] += v.double()
        steps.append(payload.get("step"))
    model = {k: (v / len(paths)).to(first["model"][k].dtype) if v.is_floating_point() else v
             for k, v in sums.items()}
    return {
        "model_config": first["model_config"],
        "model": model,
        "src_vocab": first["src_vocab"],
        "tgt_vocab": first["tgt_vocab"],
        "step": max((s for s in steps if isinstance(s, int)), default=None),
        "averaged_from": [str(p) for p in paths],
    }
