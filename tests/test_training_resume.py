"""Exact resume, reproducible runs, step checkpoints, metrics and validation BLEU."""

from __future__ import annotations

import json
import shutil
import sys
import types

import pytest
import torch

from conftest import TINY_MODEL
from rnmt.checkpoint import load_checkpoint
from rnmt.training import TrainConfig, Trainer

DROPOUT_MODEL = dict(TINY_MODEL, dropout=0.3)


def _config(save_dir, **options) -> TrainConfig:
    options = {"max_tokens": 800, "device": "cpu", "plot": False, "lr": 3e-3, **options}
    return TrainConfig(save_dir=save_dir, **options)


def test_resume_gives_the_parameters_of_one_straight_run(bin_dir, tmp_path):
    # 18 batches an epoch: 20 updates stop inside epoch 2, 40 cross into epoch 3; dropout
    # draws from the RNG, and validation with decoding runs in between.
    options = dict(valid_every=7, valid_bleu=True, keep_last=1)
    straight = Trainer(bin_dir, DROPOUT_MODEL, _config(tmp_path / "a", max_steps=40, **options))
    assert len(straight.sampler.batches(0)) == 18
    straight.train()
    Trainer(bin_dir, DROPOUT_MODEL, _config(tmp_path / "b", max_steps=20, **options)).train()
    resumed = Trainer(bin_dir, DROPOUT_MODEL,
                      _config(tmp_path / "b", max_steps=40, resume=True, **options))
    assert resumed.state.step == 20
    resumed.train()
    for (name, p), q in zip(straight.model.named_parameters(), resumed.model.parameters()):
        assert (p - q).abs().max() <= 1e-6, name


def test_resume_on_other_data_restarts_the_epoch_with_a_warning(bin_dir, tmp_path):
    # The same vocabulary, another training set: the saved position counted other batches.
    other = tmp_path / "other-bin"
    shutil.copytree(bin_dir, other)
    for lang in ("en", "de"):
        for suffix in ("ids.npy", "offsets.npy"):
            shutil.copy(bin_dir / f"valid.{lang}.{suffix}", other / f"train.{lang}.{suffix}")
    Trainer(bin_dir, TINY_MODEL, _config(tmp_path / "run", max_steps=5)).train()
    resumed = Trainer(other, TINY_MODEL, _config(tmp_path / "run", max_steps=7, resume=True))
    assert (resumed.sampler.epoch, resumed.sampler.position) == (0, 0)
    warned: list[str] = []
    resumed.reporter.warning = warned.append
    resumed.train()
    assert len(warned) == 1 and "the training data or its batching changed" in warned[0]
    assert "epoch 1 starts over on the new batches instead of continuing after batch 5" \
        in warned[0]
    # On the same data nothing is said and the position carries over.
    same = Trainer(bin_dir, TINY_MODEL, _config(tmp_path / "run2", max_steps=5))
    same.train()
    again = Trainer(bin_dir, TINY_MODEL, _config(tmp_path / "run2", max_steps=6, resume=True))
    assert (again.sampler.epoch, again.sampler.position) == (0, 5)
    assert again.resume_warning is None


def _records(save_dir) -> list[dict]:
    """The run's metrics.jsonl, one dict per line."""
    return [json.loads(line) for line in (save_dir / "metrics.jsonl").read_text().splitlines()]


def _losses(save_dir) -> list[float]:
    return [r["loss"] for r in _records(save_dir) if r["kind"] == "train"]


def test_same_seed_same_data_gives_the_same_loss_curve(bin_dir, tmp_path):
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        Trainer(bin_dir, DROPOUT_MODEL, _config(tmp_path / name, max_steps=12, log_every=1,
                                                seed=seed)).train()
    assert len(_losses(tmp_path / "a")) == 12
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b")
    assert _losses(tmp_path / "a") != _losses(tmp_path / "c")


def test_keep_last_keeps_the_newest_step_checkpoints_beside_best_and_last(bin_dir, tmp_path):
    Trainer(bin_dir, TINY_MODEL, _config(tmp_path, max_steps=8, valid_every=2,
                                         keep_last=2)).train()
    names = sorted(p.name for p in tmp_path.glob("*.pt"))
    assert names == ["best.pt", "checkpoint_6.pt", "checkpoint_8.pt", "last.pt"]
    assert load_checkpoint(tmp_path / "checkpoint_6.pt")["step"] == 6


def test_metrics_and_resolved_config_are_written_to_the_save_dir(bin_dir, tmp_path):
    Trainer(bin_dir, TINY_MODEL, _config(tmp_path, max_steps=4, log_every=2,
                                         label_smoothing=0.1)).train()
    records = _records(tmp_path)
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [2, 4]
    assert {"loss", "ppl", "lr", "tokens_per_s"} <= set(train[0])
    assert any(r["kind"] == "valid" and "valid_ppl" in r for r in records)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["label_smoothing"] == 0.1 and config["emb_dim"] == TINY_MODEL["emb_dim"]
    assert load_checkpoint(tmp_path / "best.pt")["train_config"] == config


def test_tensorboard_events_hold_the_logged_metrics(bin_dir, tmp_path):
    accumulator = pytest.importorskip(  # in the dev extra: CI runs this
        "tensorboard.backend.event_processing.event_accumulator")
    Trainer(bin_dir, TINY_MODEL, _config(tmp_path, max_steps=4, log_every=2,
                                         valid_every=4)).train()
    events = accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    records = _records(tmp_path)
    for kind, key in (("train", "loss"), ("train", "lr"), ("valid", "valid_ppl")):
        logged = [(r["step"], r[key]) for r in records if r["kind"] == kind]
        scalars = [(e.step, e.value) for e in events.Scalars(f"{kind}/{key}")]
        assert logged and [s for s, _ in scalars] == [s for s, _ in logged], (kind, key)
        assert [v for _, v in scalars] == pytest.approx([v for _, v in logged], rel=1e-6)


def test_training_without_tensorboard_writes_no_events(bin_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    Trainer(bin_dir, TINY_MODEL, _config(tmp_path, max_steps=2, log_every=1)).train()
    assert len(_losses(tmp_path)) == 2
    assert not (tmp_path / "tensorboard").exists()


class _BrokenModule(types.ModuleType):
    def __getattr__(self, name):
        raise TypeError("Descriptors cannot be created directly.\nIf this call came from ...")


def test_a_tensorboard_that_fails_to_load_is_a_warning_not_a_crash(bin_dir, tmp_path,
                                                                   monkeypatch):
    # As a tensorboard built against another protobuf release fails: not an ImportError.
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", _BrokenModule("broken"))
    trainer = Trainer(bin_dir, TINY_MODEL, _config(tmp_path, max_steps=2, log_every=1))
    warned: list[str] = []
    trainer.reporter.warning = warned.append
    trainer.train()
    assert warned == ["tensorboard is installed but failed to load (TypeError: Descriptors "
                      "cannot be created directly.); no TensorBoard events are written"]
    assert len(_losses(tmp_path)) == 2
    assert not (tmp_path / "tensorboard").exists()


def test_validation_decodes_and_scores_bleu_and_chrf(bin_dir, tmp_path, trained_checkpoint):
    trainer = Trainer(bin_dir, TINY_MODEL, _config(tmp_path, max_steps=1, valid_bleu=True,
                                                   valid_samples=2))
    trainer.model.load_state_dict(load_checkpoint(trained_checkpoint)["model"])
    seen = []
    trainer.reporter.validation = seen.append
    trainer.validate()
    stats = seen[-1]
    assert stats["bleu"] > 50 and stats["chrf"] > 80  # the fixture model has learned the task
    assert len(stats["samples"]) == 2
    assert sum(s["hypothesis"] == s["reference"] for s in stats["samples"]) >= 1


def test_best_checkpoint_follows_bleu_when_asked(bin_dir, tmp_path, trained_checkpoint):
    config = _config(tmp_path, max_steps=1, best_metric="bleu")
    trainer = Trainer(bin_dir, TINY_MODEL, config)
    trainer.model.load_state_dict(load_checkpoint(trained_checkpoint)["model"])
    stats = trainer.validate()
    assert stats["best"] and trainer.state.best_bleu == stats["bleu"] and (tmp_path / "best.pt").exists()
