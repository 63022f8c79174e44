"""Optimisation: gradient accumulation, label smoothing, schedules, early stopping, bad updates."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY_MODEL
from rnmt.data import collate
from rnmt.errors import ConfigError
from rnmt.nn.loss import smoothed_token_loss
from rnmt.optim import LRSchedule, ScheduleConfig, build_optimizer
from rnmt.training import TrainConfig, Trainer, TrainingDiverged
from rnmt.vocab import PAD


def _trainer(bin_dir, tmp_path, **options) -> Trainer:
    options = {"max_tokens": 800, "device": "cpu", "plot": False, **options}
    return Trainer(bin_dir, TINY_MODEL, TrainConfig(save_dir=tmp_path, **options))


@pytest.mark.parametrize("optimizer,lr", [("sgd", 0.5), ("adam", 1e-3)])
def test_accumulating_two_batches_updates_like_one_batch_of_both(bin_dir, tmp_path,
                                                                  optimizer, lr):
    a, b = _trainer(bin_dir, tmp_path / "a", optimizer=optimizer, lr=lr, update_freq=2), \
        _trainer(bin_dir, tmp_path / "b", optimizer=optimizer, lr=lr)
    first, second = a.sampler.batches(0)[:2]
    assert len(first) != len(second) or (first != second).any()
    for _ in range(2):  # the second update also checks the optimizer's state
        a.train_step([collate(a.train_data, first), collate(a.train_data, second)])
        b.train_step([collate(b.train_data, list(first) + list(second))])
    for (name, p), q in zip(a.model.named_parameters(), b.model.parameters()):
        assert (p - q).abs().max() <= 1e-5, name


def test_label_smoothing_reports_the_real_nll_and_ignores_padding():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    target = torch.randint(4, 11, (2, 5))
    target[1, 3:] = PAD
    loss, nll = smoothed_token_loss(logits, target, 0.1, PAD)
    reference = F.cross_entropy(logits.reshape(-1, 11), target.reshape(-1), ignore_index=PAD,
                                reduction="sum")
    torch.testing.assert_close(nll, reference)
    smoothed = F.cross_entropy(logits.reshape(-1, 11), target.reshape(-1), ignore_index=PAD,
                               reduction="sum", label_smoothing=0.1)
    torch.testing.assert_close(loss, smoothed)  # q = (1 − ε) onehot + ε uniform, as torch's
    assert not torch.allclose(loss, nll)
    logits[1, 3:] = 100.0  # whatever the model says at padding does not count
    again, _ = smoothed_token_loss(logits, target, 0.1, PAD)
    torch.testing.assert_close(again, loss)


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_adam_on_the_cpu_takes_the_fused_kernel_with_the_plain_update(name):
    """Where torch has a fused CPU Adam (2.4 and newer) rnmt uses it; its updates are
    torch's plain Adam/AdamW updates up to rounding."""
    torch.manual_seed(0)
    start = torch.randn(50)
    grads = [torch.randn(50) for _ in range(5)]
    fused_param, plain_param = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    fused = build_optimizer(name, [fused_param], 0.01, weight_decay=0.1)
    kind = torch.optim.Adam if name == "adam" else torch.optim.AdamW
    plain = kind([plain_param], lr=0.01, weight_decay=0.1)
    version = tuple(int(x) for x in torch.__version__.split(".")[:2])
    assert bool(fused.defaults.get("fused")) == (version >= (2, 4))
    for g in grads:
        for param, opt in ((fused_param, fused), (plain_param, plain)):
            param.grad = g.clone()
            opt.step()
    torch.testing.assert_close(fused_param, plain_param, rtol=1e-5, atol=1e-6)
    assert not torch.equal(fused_param, start)


def _rates(name: str, n: int, **options) -> list[float]:
    opt = build_optimizer("sgd", [torch.nn.Parameter(torch.zeros(1))], 1.0)
    schedule = LRSchedule(ScheduleConfig(name=name, lr=1.0, **options), opt)
    return [schedule.before_update(i) for i in range(1, n + 1)]


def test_warmup_rises_linearly_then_each_schedule_decays_its_way():
    assert _rates("constant", 6, warmup=4) == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert _rates("inverse-sqrt", 16, warmup=4)[15] == pytest.approx(math.sqrt(4 / 16))
    assert _rates("exponential", 14, warmup=4, lr_decay=0.5, lr_decay_steps=5)[13] == \
        pytest.approx(0.25)


def test_plateau_halves_the_rate_after_patience_validations_without_improvement():
    opt = build_optimizer("sgd", [torch.nn.Parameter(torch.zeros(1))], 1.0)
    schedule = LRSchedule(ScheduleConfig(name="plateau", lr=1.0, patience=2), opt)
    rates = []
    for value in (3.0, 2.0, 2.5, 2.1, 2.2, 1.0, 1.5):
        schedule.after_validation(value, higher_is_better=False)
        rates.append(schedule.before_update(1))
    assert rates == [1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.5]


def test_min_lr_stops_training(bin_dir, tmp_path):
    summary = _trainer(bin_dir, tmp_path, lr_scheduler="exponential", lr_decay=0.5,
                       lr_decay_steps=1, min_lr=0.1 * 1e-3, max_steps=50).train()
    assert "--min-lr" in summary["reason"] and summary["step"] == 4


def test_early_stopping_ends_a_run_that_stopped_improving(bin_dir, tmp_path):
    # lr 1e-30 leaves every float32 parameter as it is: the valid loss never improves.
    summary = _trainer(bin_dir, tmp_path, optimizer="sgd", lr=1e-30, valid_every=1,
                       early_stop_patience=2, max_steps=50).train()
    assert summary["reason"].startswith("early stopping") and summary["step"] == 3


def test_plateau_cuts_the_rate_in_a_run_and_the_floor_stops_it(bin_dir, tmp_path):
    trainer = _trainer(bin_dir, tmp_path, optimizer="sgd", lr=1e-30, valid_every=1,
                       lr_scheduler="plateau", patience=1, min_lr=0.3e-30, max_steps=50)
    summary = trainer.train()
    # each validation reports the rate its updates ran at, then the schedule cuts it
    assert [round(v["lr"] / 1e-30, 3) for v in trainer.state.history] == [1.0, 1.0, 0.5]
    assert trainer.schedule.lr == pytest.approx(0.25e-30)
    assert "--min-lr" in summary["reason"] and summary["step"] == 3


def test_nan_updates_are_skipped_then_stop_the_run_with_the_good_state_saved(bin_dir, tmp_path):
    trainer = _trainer(bin_dir, tmp_path, max_steps=50, max_bad_updates=3, save_every=2)
    original_step = trainer.train_step

    def poisoned(batches, *rest):  # from the third update on, the decoder's output turns to nan
        if trainer.state.step >= 2:
            trainer.model.projection.register_forward_hook(lambda m, i, out: out * float("nan"))
            trainer.train_step = original_step
        return original_step(batches, *rest)

    trainer.train_step = poisoned
    with pytest.raises(TrainingDiverged, match="3 updates in a row"):
        trainer.train()
    saved = torch.load(tmp_path / "last.pt", weights_only=True)
    assert saved["step"] == 2 and saved["training"]["state"]["skipped_updates"] == 3
    assert saved["training"]["state"]["elapsed"] > 0  # counted in, for --max-time
    for name, value in saved["model"].items():
        assert torch.isfinite(value).all(), name


def test_bleu_is_refused_for_a_language_model(bin_dir, tmp_path):
    with pytest.raises(ConfigError, match="perplexity only"):
        Trainer(bin_dir, dict(TINY_MODEL, arch="lm"),
                TrainConfig(save_dir=tmp_path, best_metric="bleu", device="cpu"))
