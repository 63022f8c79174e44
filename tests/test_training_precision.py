"""Mixed precision: bf16 autocast trains on the CPU with fp32 weights; fp16 loss scaling
skips overflowing updates and resumes with its scale; fp16 on a CPU is refused."""

from __future__ import annotations

import pytest
import torch

import rnmt.training as training
from conftest import TINY_MODEL, run_rnmt
from rnmt.checkpoint import load_checkpoint
from rnmt.data import collate
from rnmt.errors import ConfigError
from rnmt.training import (SilentReporter, TrainConfig, Trainer, cpu_has_bf16_units,
                           evaluate_loss)


class WarningRecorder(SilentReporter):
    def __init__(self) -> None:
        self.warnings: list[str] = []

    def warning(self, message: str) -> None:
        self.warnings.append(message)


def test_bf16_training_on_a_cpu_lowers_the_loss_and_keeps_fp32_weights(bin_dir, tmp_path):
    reporter = WarningRecorder()
    trainer = Trainer(bin_dir, TINY_MODEL,
                      TrainConfig(save_dir=tmp_path, max_tokens=400, lr=1e-2, max_steps=4,
                                  device="cpu", precision="bf16", plot=False), reporter)
    before = evaluate_loss(trainer.model, trainer.valid_data, 800, trainer.device)
    summary = trainer.train()
    assert summary["best_valid_loss"] < before - 0.5
    saved = load_checkpoint(tmp_path / "last.pt")
    assert {t.dtype for t in saved["model"].values()} == {torch.float32}
    moments = [t for state in saved["training"]["optimizer"]["state"].values()
               for key, t in state.items() if key != "step"]
    assert moments and {t.dtype for t in moments} == {torch.float32}
    assert saved["train_config"]["precision"] == "bf16"
    # the one-line warning comes exactly when this CPU lacks bf16 matrix units
    assert len(reporter.warnings) == (0 if cpu_has_bf16_units() else 1)


def test_fp16_on_a_cpu_is_a_one_line_error(bin_dir, tmp_path):
    result = run_rnmt("train", str(bin_dir), "--save-dir", str(tmp_path), "--device", "cpu",
                      "--precision", "fp16")
    lines = result.stderr.decode().strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1
    assert lines[0].startswith("rnmt: error: --precision fp16 needs a CUDA device")
    assert not (tmp_path / "last.pt").exists()


def test_an_unknown_precision_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="unknown --precision 'fp8'"):
        TrainConfig(save_dir=tmp_path, precision="fp8")


def test_fp16_loss_scaling_skips_an_overflow_halves_the_scale_and_resumes_with_it(
        bin_dir, tmp_path, monkeypatch):
    # The CUDA path's logic, run on the CPU (autocast to fp16 works there, slowly). Without
    # oneDNN: on a CPU with AVX512-FP16 torch hands the fp16 LSTM to oneDNN, which has no
    # fp16 LSTM training primitive ("could not create a primitive descriptor"); rnmt itself
    # refuses fp16 on a CPU, so only this CUDA stand-in meets it.
    monkeypatch.setattr(training, "check_precision", lambda precision, device: None)
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)
    config = TrainConfig(save_dir=tmp_path, max_tokens=400, device="cpu", precision="fp16",
                         plot=False)
    trainer = Trainer(bin_dir, TINY_MODEL, config)
    batch = collate(trainer.train_data, trainer.sampler.batches(0)[0])
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.scaler.load_state_dict({**trainer.scaler.state_dict(), "scale": 2.0 ** 100})
    result = trainer.train_step([batch])  # fp16 gradients overflow at this scale
    assert not result["updated"] and trainer.state.step == 0
    assert trainer.state.skipped_updates == 1 and trainer.state.bad_updates == 0
    assert trainer.scaler.get_scale() == 2.0 ** 99
    for p, q in zip(before, trainer.model.parameters()):
        assert torch.equal(p, q)
    trainer.scaler.load_state_dict({**trainer.scaler.state_dict(), "scale": 1024.0})
    assert trainer.train_step([batch])["updated"] and trainer.state.step == 1
    trainer.save()
    resumed = Trainer(bin_dir, TINY_MODEL, TrainConfig(**{**vars(config), "resume": True}))
    assert resumed.scaler.state_dict() == trainer.scaler.state_dict()


@pytest.mark.parametrize("amx, avx512_bf16, units", [
    (False, False, False), (True, False, True), (False, True, True), (True, True, True)])
def test_bf16_units_are_amx_or_avx512_bf16_and_only_their_absence_warns(
        monkeypatch, amx, avx512_bf16, units):
    # The CPU's answer is faked both ways, so the warning's logic is checked on any machine
    # (the end-to-end tests can only see this machine's answer).
    import rnmt.precision as precision

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16,
                        raising=False)
    precision.cpu_has_bf16_units.cache_clear()
    try:
        assert precision.cpu_has_bf16_units() is units
        warning = precision.check_precision("bf16", torch.device("cpu"))
        assert (warning is None) is units
        if warning is not None:
            assert warning.startswith("--precision bf16 on a CPU without AMX or AVX512-BF16")
        assert precision.check_precision("fp32", torch.device("cpu")) is None
    finally:
        precision.cpu_has_bf16_units.cache_clear()  # the next caller asks the real CPU
