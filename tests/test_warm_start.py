"""`rnmt train --init-from`: a new run from a trained model's weights (fine-tuning)."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import TINY_MODEL, TINY_MODEL_FLAGS, assert_one_line_error, run_rnmt
from rnmt.checkpoint import load_checkpoint
from rnmt.errors import ConfigError
from rnmt.training import TrainConfig, Trainer, evaluate_loss
from rnmt.vocab import Vocabulary
from rnmt.warm_start import vocabulary_side



def _config(tmp_path, name: str, **options) -> TrainConfig:
    return TrainConfig(save_dir=tmp_path / name, max_tokens=800, device="cpu", seed=3,
                       plot=False, **options)


@pytest.fixture(scope="module")
def subset_checkpoint(corpus_dir, bin_dir, tmp_path_factory):
    """A model trained on 40 lines of the corpus, cut with the corpus's own sentencepiece
    model: its vocabularies hold fewer pieces than the whole corpus's, in another order."""
    from rnmt.preprocess import PreprocessConfig, preprocess

    root = tmp_path_factory.mktemp("subset")
    for lang in ("en", "de"):
        lines = (corpus_dir / f"train.{lang}").read_text(encoding="utf-8").splitlines()
        (root / f"train.{lang}").write_text("\n".join(lines[:40]) + "\n", encoding="utf-8")
    preprocess(PreprocessConfig(src_lang="en", tgt_lang="de", out=root / "bin",
                                train=str(root / "train"), valid=str(corpus_dir / "valid"),
                                spm_model=bin_dir / "spm.model"))
    save_dir = root / "run"
    Trainer(root / "bin", TINY_MODEL, TrainConfig(save_dir=save_dir, max_tokens=800,
                                                  max_steps=3, device="cpu", plot=False)).train()
    return save_dir / "last.pt"


def test_a_warm_started_run_begins_with_the_checkpoints_weights_and_a_fresh_optimizer(
        bin_dir, trained_checkpoint, tmp_path):
    payload = load_checkpoint(trained_checkpoint)
    trainer = Trainer(bin_dir, dict(TINY_MODEL, dropout=0.1),
                      _config(tmp_path, "ft", init_from=trained_checkpoint, max_steps=2, lr=1e-4))
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(value, payload["model"][name]), name
    assert trainer.model_config.dropout == 0.1  # the one model option that may change
    assert trainer.state.step == 0 and not trainer.optimizer.state
    assert trainer.warm_start.step == payload["step"]
    assert trainer.warm_start.pieces == {side: (len(v), len(v)) for side, v in
                                         (("src", trainer.src_vocab), ("tgt", trainer.tgt_vocab))}
    # The trained model's validation loss, not a fresh model's.
    from rnmt.translator import load_model

    trained = load_model(trained_checkpoint, torch.device("cpu")).model
    valid = trainer.valid_data
    assert evaluate_loss(trainer.model, valid, 800, trainer.device) == pytest.approx(
        evaluate_loss(trained, valid, 800, torch.device("cpu")), rel=1e-6)
    summary = trainer.train()
    assert summary["step"] == 2
    last = load_checkpoint(tmp_path / "ft" / "last.pt")
    assert last["step"] == 2 and last["train_config"]["init_from"] == str(trained_checkpoint)


def test_pieces_are_matched_by_their_text_when_the_vocabularies_differ(bin_dir,
                                                                        subset_checkpoint,
                                                                        tmp_path):
    payload = load_checkpoint(subset_checkpoint)
    warm = Trainer(bin_dir, TINY_MODEL, _config(tmp_path, "warm", init_from=subset_checkpoint))
    cold = Trainer(bin_dir, TINY_MODEL, _config(tmp_path, "cold"))  # the same seed
    new = {"src": warm.src_vocab, "tgt": warm.tgt_vocab}
    old = {side: {p: i for i, p in enumerate(Vocabulary.from_state_dict(
        payload[f"{side}_vocab"]).pieces)} for side in new}
    for side in new:
        found = sum(p in old[side] for p in new[side].pieces)
        assert 4 < found < len(new[side])  # some pieces moved, some are new
        assert warm.warm_start.pieces[side] == (found, len(new[side]))
    warm_state, cold_state = warm.model.state_dict(), cold.model.state_dict()
    vocabulary_parameters = [n for n in warm_state if vocabulary_side(n)]
    assert sorted(vocabulary_parameters) == ["decoder.embed.weight", "encoder.embed.weight",
                                             "generator.bias", "generator.weight"]
    for name in vocabulary_parameters:
        side = vocabulary_side(name)
        for i, piece in enumerate(new[side].pieces):
            expected = (payload["model"][name][old[side][piece]] if piece in old[side]
                        else cold_state[name][i])
            assert torch.equal(warm_state[name][i], expected), (name, piece)
    for name in set(warm_state) - set(vocabulary_parameters):
        assert torch.equal(warm_state[name], payload["model"][name]), name


def test_a_warm_start_refuses_another_model(bin_dir, trained_checkpoint, tmp_path):
    with pytest.raises(ConfigError, match=r"--hidden-dim 48 \(the checkpoint's: 32\)"):
        Trainer(bin_dir, dict(TINY_MODEL, hidden_dim=48),
                _config(tmp_path, "x", init_from=trained_checkpoint))
    assert not (tmp_path / "x").exists()


def test_rnmt_train_init_from_fine_tunes_and_resumes(bin_dir, trained_checkpoint, tmp_path):
    """The command takes the checkpoint's model without its options given again; a resumed
    warm-started run continues its own weights."""
    base = ["train", str(bin_dir), "--device", "cpu", "--threads", "1", "--no-plot",
            "--max-tokens", "800"]
    ft = tmp_path / "ft"
    result = run_rnmt(*base, "--save-dir", str(ft), "--init-from", str(trained_checkpoint),
                      "--max-steps", "2", "--lr", "1e-4", "--dropout", "0.1")
    assert result.returncode == 0, result.stderr.decode()
    err = result.stderr.decode()
    assert f"weights from {trained_checkpoint} (step 300)" in err
    config = json.loads((ft / "config.json").read_text())
    assert config["init_from"] == str(trained_checkpoint) and config["dropout"] == 0.1
    assert all(config[k] == v for k, v in TINY_MODEL.items() if k != "dropout")
    result = run_rnmt(*base, "--save-dir", str(ft), "--resume", "--max-steps", "4")
    assert result.returncode == 0, result.stderr.decode()
    assert "weights from" not in result.stderr.decode()
    assert load_checkpoint(ft / "last.pt")["step"] == 4

    for extra, needle in (
        (["--init-from", str(trained_checkpoint), "--hidden-dim", "48"],
         "it cannot change --hidden-dim 48 (the checkpoint's: 32)"),
        (["--init-from", str(tmp_path / "absent.pt")], "no such checkpoint"),
        (["--init-from", str(bin_dir / "meta.json")], "corrupt or truncated checkpoint"),
    ):
        assert_one_line_error(run_rnmt(*base, "--save-dir", str(tmp_path / "new"), *extra),
                              needle)
        assert not (tmp_path / "new").exists()
    assert_one_line_error(run_rnmt(*base, "--save-dir", str(ft), "--resume", "--init-from",
                                   str(trained_checkpoint)), "give one of them")
