"""Checkpoints: atomic writes, safe loads, clear errors."""

from __future__ import annotations

import pickle
import random

import pytest
import torch

from rnmt.checkpoint import load_checkpoint, save_checkpoint
from rnmt.errors import CheckpointError

PAYLOAD = {"model_config": {}, "model": {"w": torch.ones(3)}, "src_vocab": {}, "tgt_vocab": {}}


class _Exploit:
    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_a_checkpoint_round_trips(tmp_path):
    save_checkpoint(PAYLOAD, tmp_path / "a.pt")
    loaded = load_checkpoint(tmp_path / "a.pt")
    assert torch.equal(loaded["model"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["a.pt"]  # no temporary file left


def test_a_crafted_pickle_never_runs(tmp_path):
    victim = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"format": "rnmt", "version": 1, "x": _Exploit(str(victim))}, path)
    with pytest.raises(CheckpointError, match="not an rnmt checkpoint"):
        load_checkpoint(path)
    assert not victim.exists()
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps(_Exploit(str(victim))))
    with pytest.raises(CheckpointError):
        load_checkpoint(raw)
    assert not victim.exists()


@pytest.mark.parametrize("damage", ["truncate", "empty", "other-format"])
def test_damaged_files_are_one_clear_error(tmp_path, damage):
    path = tmp_path / "c.pt"
    save_checkpoint(PAYLOAD, path)
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="c.pt"):
        load_checkpoint(path)


def test_random_bytes_are_one_clear_error(tmp_path):
    # Seeded, so every run tries the same 300 files; 23 of them once escaped as IndexError.
    path = tmp_path / "c.pt"
    for seed in range(300):
        path.write_bytes(random.Random(seed).randbytes(2000))
        with pytest.raises(CheckpointError, match="c.pt: corrupt|c.pt: not an rnmt"):
            load_checkpoint(path)


def test_a_newer_format_version_is_refused(tmp_path):
    path = tmp_path / "v.pt"
    torch.save({**PAYLOAD, "format": "rnmt", "version": 99}, path)
    with pytest.raises(CheckpointError, match="version 99"):
        load_checkpoint(path)


@pytest.mark.parametrize("error, message", [
    (OSError(28, "No space left on device"), "No space left"),
    # what torch.save's zip writer raises when the disk fills (a traceback before)
    (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0"),
     "unexpected pos 64 vs 0"),
])
def test_a_failed_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch, error, message):
    path = tmp_path / "last.pt"
    save_checkpoint(PAYLOAD, path)

    def disk_full(payload, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise error

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(CheckpointError, match=message):
        save_checkpoint({**PAYLOAD, "model": {"w": torch.zeros(3)}}, path)
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]
