"""The RNN language model: the search protocol, and preprocess --mono + train --arch lm."""

from __future__ import annotations

import json
import re

import pytest
import torch

from rnmt.errors import ConfigError
from rnmt.models import LanguageModel, ModelConfig, build_model
from rnmt.training import TrainConfig, Trainer
from rnmt.translator import load_model
from rnmt.vocab import BOS, EOS
from conftest import run_rnmt

SMALL = dict(emb_dim=12, dec_hidden_dim=16, dec_layers=2, dropout=0.0)
TEXT = torch.tensor([[BOS, 5, 6, 7, 8], [BOS, 9, 10, 0, 0]])


def _lm(cell: str = "lstm", **overrides) -> LanguageModel:
    torch.manual_seed(0)
    config = ModelConfig(src_vocab_size=20, tgt_vocab_size=20, arch="lm", cell=cell,
                         **{**SMALL, **overrides})
    model = build_model(config)
    assert isinstance(model, LanguageModel)
    return model.eval().double()


def test_an_lm_encodes_nothing_but_the_batch_size():
    model = _lm()
    enc = model.encode(torch.tensor([[7, 8, EOS], [9, EOS, 0]]), torch.tensor([3, 2]))
    assert enc.memory.shape == (2, 0, 0) and enc.mask.shape == (2, 0)
    state = model.init_state(enc)
    assert all(bool((part == 0).all()) and part.shape == (2, 2, 16) for part in state.hidden)


def test_an_lm_ignores_the_source_in_teacher_forcing():
    model = _lm()
    one = model(torch.tensor([[EOS], [EOS]]), torch.tensor([1, 1]), TEXT)
    other = model(torch.tensor([[4, 5, EOS], [6, EOS, 0]]), torch.tensor([3, 2]), TEXT)
    torch.testing.assert_close(one, other, rtol=0, atol=0)
    assert one.shape == (2, 5, 20)


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_lm_steps_equal_teacher_forcing_and_reordering_follows_the_rows(cell):
    model = _lm(cell)
    dummy = torch.full((2, 1), EOS)
    forced = torch.log_softmax(model(dummy, torch.tensor([1, 1]), TEXT), -1)
    enc = model.encode(dummy, torch.tensor([1, 1]))
    state = model.init_state(enc)
    for t in range(TEXT.size(1)):
        log_probs, state, attn = model.step(TEXT[:, t], state, enc)
        assert attn is None
        torch.testing.assert_close(log_probs, forced[:, t])
    swap = torch.tensor([1, 0])
    state, enc = model.reorder_state(state, swap), model.reorder_encoder(enc, swap)
    swapped, _, _ = model.step(torch.tensor([EOS, EOS]), state, enc)
    assert enc.memory.shape == (2, 0, 0)
    assert not torch.allclose(swapped[0], swapped[1])


def test_an_lm_takes_no_source_side_options():
    for bad in (dict(share_embeddings=True), dict(reverse_source=True)):
        with pytest.raises(ConfigError):
            ModelConfig(src_vocab_size=20, tgt_vocab_size=20, arch="lm", **bad)


def test_an_lm_trains_on_the_target_side_of_a_parallel_corpus(bin_dir, tmp_path):
    trainer = Trainer(bin_dir, dict(arch="lm", **SMALL),
                      TrainConfig(save_dir=tmp_path, max_tokens=600, max_steps=2, device="cpu"))
    trainer.train()
    loaded = load_model(tmp_path / "best.pt", torch.device("cpu"))
    assert loaded.src_vocab == loaded.tgt_vocab == trainer.tgt_vocab


@pytest.fixture(scope="module")
def mono_dir(corpus_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bin") / "en-lm"
    result = run_rnmt("preprocess", "--mono", "-l", "en", "--train", str(corpus_dir / "train"),
                      "--valid", str(corpus_dir / "valid"), "--out", str(out),
                      "--vocab-size", "200")
    assert result.returncode == 0, result.stderr.decode()
    return out


def test_preprocess_mono_writes_one_language(mono_dir):
    meta = json.loads((mono_dir / "meta.json").read_text())
    assert meta["mono"] is True and meta["lang"] == meta["src_lang"] == meta["tgt_lang"] == "en"
    assert (mono_dir / "train.en.ids.npy").exists() and (mono_dir / "valid.en.offsets.npy").exists()
    assert not list(mono_dir.glob("*.de.*"))


def test_train_arch_lm_through_the_cli_lowers_perplexity(mono_dir, tmp_path):
    result = run_rnmt("train", str(mono_dir), "--arch", "lm", "--save-dir", str(tmp_path),
                      "--emb-dim", "32", "--dec-hidden-dim", "64", "--dropout", "0",
                      "--max-steps", "40", "--max-tokens", "800", "--lr", "5e-3",
                      "--valid-every", "10", "--device", "cpu")
    log = result.stderr.decode()
    assert result.returncode == 0, log
    assert re.search(r"model lm \(lstm\): [\d,]+ parameters", log)
    perplexities = [float(p) for p in re.findall(r"valid epoch \d+ step \d+: loss \S+ ppl (\S+)", log)]
    assert len(perplexities) >= 3
    loaded = load_model(tmp_path / "best.pt", torch.device("cpu"))
    vocab = len(loaded.tgt_vocab)
    assert perplexities[-1] < perplexities[0] and perplexities[-1] < vocab / 4, perplexities
    assert loaded.model.config.arch == "lm" and loaded.src_vocab == loaded.tgt_vocab


def test_a_monolingual_corpus_trains_only_a_language_model(mono_dir, tmp_path):
    with pytest.raises(ConfigError, match="--arch lm"):
        Trainer(mono_dir, dict(arch="attention"), TrainConfig(save_dir=tmp_path, device="cpu"))


@pytest.mark.parametrize("languages", [["--mono", "-s", "en", "-t", "de"], ["--mono"],
                                       ["-l", "en"], ["-s", "en"]])
def test_preprocess_needs_one_language_with_mono_and_two_without(corpus_dir, tmp_path, languages):
    from typer.testing import CliRunner

    from rnmt_cli.main import app

    result = CliRunner().invoke(app, ["preprocess", *languages, "--train",
                                      str(corpus_dir / "train"), "--out", str(tmp_path / "x")])
    err = result.stderr.strip()
    assert result.exit_code == 2 and err.startswith("rnmt: error:") and len(err.splitlines()) == 1
    assert not (tmp_path / "x").exists()
