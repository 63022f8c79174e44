"""Training: the loss falls, a tiny model learns the demo task, checkpoints resume."""

from __future__ import annotations

import json

import pytest
import torch
from sacrebleu.metrics import CHRF

from conftest import TINY_MODEL
from rnmt import training
from rnmt.data import collate
from rnmt.preprocess import load_data
from rnmt.training import TrainConfig, Trainer, clip_gradients, evaluate_loss, gradient_norm
from rnmt.translator import Translator, load_model
from rnmt.search import SearchConfig


def test_loss_falls_on_a_tiny_task(bin_dir, tmp_path):
    trainer = Trainer(bin_dir, TINY_MODEL, TrainConfig(save_dir=tmp_path, max_tokens=800,
                                                       lr=3e-3, max_steps=40, device="cpu"))
    before = evaluate_loss(trainer.model, trainer.valid_data, 800, trainer.device)
    trainer.train()
    after = evaluate_loss(trainer.model, trainer.valid_data, 800, trainer.device)
    assert after < before - 1.0


def test_a_trained_model_translates_most_unseen_numbers(trained_checkpoint, corpus_dir):
    sources = (corpus_dir / "test.en").read_text().splitlines()
    references = (corpus_dir / "test.de").read_text().splitlines()
    translator = Translator.load(trained_checkpoint, SearchConfig(beam=3), device="cpu")
    hyps = list(translator.translate_lines(sources))
    exact = sum(h == r for h, r in zip(hyps, references)) / len(references)
    assert CHRF().corpus_score(hyps, [references]).score > 85
    assert exact >= 0.5  # whole German number words right, units before tens


def test_checkpoint_is_self_contained(trained_checkpoint, bin_dir):
    loaded = load_model(trained_checkpoint, torch.device("cpu"))
    _, valid = load_data(bin_dir, "valid")
    batch = collate(valid, list(range(8)))
    logits = loaded.model(batch.src, batch.src_lengths, batch.tgt_in)
    assert logits.shape[-1] == len(loaded.tgt_vocab)


def test_evaluation_gives_the_model_back_in_its_own_mode_even_after_an_error(
        trained_checkpoint, bin_dir, monkeypatch):
    model = load_model(trained_checkpoint, torch.device("cpu")).model
    _, valid = load_data(bin_dir, "valid")
    for mode in (True, False):
        model.train(mode)
        evaluate_loss(model, valid, 800, torch.device("cpu"))
        assert model.training is mode

    def fails(model, batch):
        assert not model.training  # dropout off while evaluating
        raise RuntimeError("out of memory")

    monkeypatch.setattr(training, "token_loss", fails)
    model.train()
    with pytest.raises(RuntimeError):
        evaluate_loss(model, valid, 800, torch.device("cpu"))
    assert model.training


def test_resume_continues_from_last_checkpoint(bin_dir, tmp_path):
    config = TrainConfig(save_dir=tmp_path, max_tokens=800, max_steps=6, device="cpu")
    Trainer(bin_dir, TINY_MODEL, config).train()
    config.max_steps, config.resume = 10, True
    trainer = Trainer(bin_dir, TINY_MODEL, config)
    assert trainer.state.step == 6
    summary = trainer.train()
    assert summary["step"] == 10


def test_validations_name_the_epoch_they_ran_in(bin_dir, tmp_path):
    """One at the end of epoch 1, one two updates into epoch 2 (the step limit): the
    second belongs to epoch 2, as the training lines around it say."""
    config = TrainConfig(save_dir=tmp_path, max_tokens=800, max_steps=1, log_every=1,
                         device="cpu")
    per_epoch = len(Trainer(bin_dir, TINY_MODEL, config).sampler.batches(0))
    config.max_steps = per_epoch + 2
    Trainer(bin_dir, TINY_MODEL, config).train()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    valid = [(r["step"], r["epoch"]) for r in records if r["kind"] == "valid"]
    assert valid == [(per_epoch, 1), (per_epoch + 2, 2)]
    last_train = [r for r in records if r["kind"] == "train"][-1]
    assert last_train["epoch"] == 2



@pytest.mark.parametrize("max_norm", [0.5, 50.0])  # below and above the gradients' norm (~8)
def test_clipping_equals_torchs_clip_grad_norm(max_norm):
    torch.manual_seed(0)
    grads = [torch.randn(7, 5), torch.randn(11), torch.randn(3, 3, 2)]
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for param, grad in zip(params, grads):
        param.grad = grad.clone()
    want_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    norm = gradient_norm(grads)
    clip_gradients(grads, max_norm, norm, float(norm))
    torch.testing.assert_close(norm, want_norm)
    for grad, param in zip(grads, params):
        torch.testing.assert_close(grad, param.grad, rtol=0, atol=0)
    assert (float(norm) > max_norm) == (max_norm == 0.5)
