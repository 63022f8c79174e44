"""Every architecture × cell learns on the demo corpus and translates from its checkpoint.

The fast set trains each architecture with an LSTM and the attention model with each cell
(in-process, ~2 s each); training and translating through the CLI, for the full grid and
for the reference cells, is marked slow (~15 s each).
"""

from __future__ import annotations

import json

import dataclasses
from pathlib import Path

import pytest
import torch

from conftest import run_rnmt
from rnmt.data import pad_sentences
from rnmt.errors import option_flag
from rnmt.models import build_model
from rnmt.preprocess import PreprocessConfig, preprocess
from rnmt.search import SearchConfig, search
from rnmt.training import TrainConfig, Trainer, evaluate_loss
from rnmt.translator import load_model
from rnmt.vocab import EOS

ZOO_TINY = dict(emb_dim=16, hidden_dim=16, dec_hidden_dim=32, attn_dim=16, output_dim=32,
                dropout=0.0)
ARCHS = {
    "seq2seq": dict(arch="seq2seq"),
    "seq2seq-reversed": dict(arch="seq2seq", reverse_source=True),
    "bahdanau": dict(arch="attention", attention="bahdanau"),
    "luong-general-feeding": dict(arch="attention", attention="general", input_feeding=True),
    "luong-dot": dict(arch="attention", attention="dot", hidden_dim=16, dec_hidden_dim=32),
}
CELLS = ("rnn", "lstm", "gru")
FAST = {(arch, "lstm") for arch in ARCHS} | {("bahdanau", cell) for cell in CELLS}
GRID = [
    pytest.param(arch, cell, marks=() if (arch, cell) in FAST else pytest.mark.slow)
    for arch in ARCHS for cell in CELLS
]


def _cli_flags(options: dict) -> list[str]:
    flags = []
    for key, value in options.items():
        flag = option_flag(key)
        if value is True:
            flags.append(flag)
        else:
            flags += [flag, str(value)]
    return flags


@pytest.mark.parametrize("arch, cell", GRID)
def test_every_architecture_and_cell_learns_on_the_demo_corpus(bin_dir, tmp_path, arch, cell):
    options = {**ZOO_TINY, **ARCHS[arch], "cell": cell}
    trainer = Trainer(bin_dir, options, TrainConfig(save_dir=tmp_path, max_tokens=600, lr=1e-2,
                                                    max_steps=30, device="cpu"))
    before = evaluate_loss(trainer.model, trainer.valid_data, 600, trainer.device)
    trainer.train()
    after = evaluate_loss(trainer.model, trainer.valid_data, 600, trainer.device)
    assert after < before - 0.8, (before, after)
    loaded = load_model(tmp_path / "best.pt", torch.device("cpu"))
    assert loaded.model.config == trainer.model_config  # the checkpoint rebuilds the model


def _train_and_translate_through_the_cli(bin_dir, corpus_dir, tmp_path, options) -> list[str]:
    save = tmp_path / "run"
    trained = run_rnmt("train", str(bin_dir), "--save-dir", str(save), "--max-steps", "30",
                       "--max-tokens", "600", "--lr", "1e-2", "--device", "cpu",
                       *_cli_flags(options))
    assert trained.returncode == 0, trained.stderr.decode()
    assert "parameters" in trained.stderr.decode()
    sources = (corpus_dir / "test.en").read_text().splitlines()[:20]
    # No architecture flag: the checkpoint says what it is.
    # --min-len 1 and the pieces from json: a barely trained model may prefer </s> (or a
    # lone '▁') at once; the claim is that the checkpoint alone rebuilds the model and
    # searches it, not how well it learned (the loss-falls tests above check learning).
    translated = run_rnmt("translate", "-m", str(save / "best.pt"), "--beam", "2",
                          "--min-len", "1", "--output-format", "json", "--device", "cpu",
                          stdin="\n".join(sources) + "\n")
    assert translated.returncode == 0, translated.stderr.decode()
    lines = translated.stdout.decode().splitlines()
    assert len(lines) == len(sources)
    # What translate rebuilt is the model trained: every option given is in its config
    # (reversing the source, say, has no parameters that a wrong rebuild would trip on).
    config = load_model(save / "best.pt", torch.device("cpu")).model.config
    for key, value in options.items():
        if key == "layers":
            assert (config.enc_layers, config.dec_layers) == (value, value)
        else:
            assert getattr(config, key) == value, key
    return [" ".join(json.loads(line)["pieces"]) for line in lines]


@pytest.mark.slow
def test_vanilla_seq2seq_with_reversed_source_trains_and_translates_through_the_cli(
        bin_dir, corpus_dir, tmp_path):
    options = {**ZOO_TINY, **ARCHS["seq2seq-reversed"], "cell": "gru"}
    lines = _train_and_translate_through_the_cli(bin_dir, corpus_dir, tmp_path, options)
    assert all(line.strip() for line in lines)


@pytest.mark.slow
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("arch", ARCHS)
def test_every_architecture_and_cell_translates_from_its_checkpoint_through_the_cli(
        bin_dir, corpus_dir, tmp_path, arch, cell):
    options = {**ZOO_TINY, **ARCHS[arch], "cell": cell, "layers": 2}
    lines = _train_and_translate_through_the_cli(bin_dir, corpus_dir, tmp_path, options)
    assert all(line.strip() for line in lines)


@pytest.mark.slow
def test_reference_cells_train_and_translate_through_the_cli(bin_dir, corpus_dir, tmp_path):
    options = {**ZOO_TINY, "cell": "gru", "cell_impl": "reference", "attention": "general",
               "input_feeding": True}
    lines = _train_and_translate_through_the_cli(bin_dir, corpus_dir, tmp_path, options)
    assert all(line.strip() for line in lines)


def test_fused_and_reference_cells_translate_a_checkpoint_identically(trained_checkpoint,
                                                                      corpus_dir):
    loaded = load_model(trained_checkpoint, torch.device("cpu"))
    fused = loaded.model.double()
    reference = build_model(dataclasses.replace(fused.config, cell_impl="reference"))
    reference.load_state_dict(fused.state_dict())
    reference.double().eval()
    sources = (corpus_dir / "test.en").read_text().splitlines()[:8]
    src, lengths = pad_sentences(loaded.src_vocab.encode(sources), suffix=EOS)
    torch.testing.assert_close(reference(src, lengths, src), fused(src, lengths, src),
                               rtol=0, atol=1e-10)
    for beam in (1, 3):
        config = SearchConfig(beam=beam)
        ours = [h.tokens for h in search(reference, src, lengths, config)]
        theirs = [h.tokens for h in search(fused, src, lengths, config)]
        assert ours == theirs
        assert all(ours)


def test_share_embeddings_without_a_joined_dictionary_is_a_one_line_error(bin_dir, tmp_path):
    from typer.testing import CliRunner

    from rnmt_cli.main import app

    result = CliRunner().invoke(app, ["train", str(bin_dir), "--save-dir", str(tmp_path),
                                      "--share-embeddings", "--max-steps", "1", "--device", "cpu"])
    err = result.stderr.strip()
    assert result.exit_code == 2
    assert not (tmp_path / "last.pt").exists()
    assert err.startswith("rnmt: error:") and len(err.splitlines()) == 1
    assert "--joined-dictionary" in err


def test_share_embeddings_with_a_joined_dictionary_trains_one_embedding(corpus_dir, tmp_path):
    out = tmp_path / "joined"
    preprocess(PreprocessConfig(src_lang="en", tgt_lang="de", out=out,
                                train=str(corpus_dir / "train"), valid=str(corpus_dir / "valid"),
                                vocab_size=300, joined_dictionary=True))
    options = {**ZOO_TINY, "share_embeddings": True, "tie_embeddings": True}
    trainer = Trainer(out, options, TrainConfig(save_dir=tmp_path / "run", max_tokens=600,
                                                lr=1e-2, max_steps=20, device="cpu"))
    model = trainer.model
    assert model.encoder.embed is model.decoder.embed
    assert model.generator.weight is model.decoder.embed.weight
    before = evaluate_loss(model, trainer.valid_data, 600, trainer.device)
    trainer.train()
    assert evaluate_loss(model, trainer.valid_data, 600, trainer.device) < before - 0.5
    reloaded = load_model(Path(tmp_path / "run" / "best.pt"), torch.device("cpu")).model
    assert reloaded.generator.weight is reloaded.encoder.embed.weight  # still one matrix
