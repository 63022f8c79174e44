"""`rnmt preprocess --vocab-from DIR`: a new corpus in the id space of an earlier one, so that
models trained on either ensemble (knowledge distillation, back-translation)."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import TINY_MODEL_FLAGS, assert_one_line_error, run_rnmt
from rnmt.preprocess import PreprocessConfig, load_meta, load_vocabularies, preprocess
from rnmt.vocab import UNK

# Characters the demo corpus never shows: sentencepiece has no piece for them.
STRANGERS = "ŧħøŋ ĸæ"


@pytest.fixture(scope="module")
def other_corpus(corpus_dir, tmp_path_factory):
    """40 lines of the corpus in another order, one of them with unknown characters: learnt
    on its own, its vocabularies would differ from the corpus's."""
    root = tmp_path_factory.mktemp("other")
    for lang in ("en", "de"):
        lines = (corpus_dir / f"train.{lang}").read_text(encoding="utf-8").splitlines()[:40]
        lines = lines[::-1]
        lines[0] += " " + STRANGERS
        (root / f"train.{lang}").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def test_the_new_corpus_takes_the_old_ones_vocabularies_and_counts_unknown_pieces(
        bin_dir, corpus_dir, other_corpus, tmp_path):
    report = preprocess(PreprocessConfig(
        src_lang="en", tgt_lang="de", out=tmp_path / "reused", train=str(other_corpus / "train"),
        valid=str(corpus_dir / "valid"), vocab_from=bin_dir))
    old_meta, new_meta = load_meta(bin_dir), load_meta(tmp_path / "reused")
    assert load_vocabularies(tmp_path / "reused", new_meta) == load_vocabularies(bin_dir, old_meta)
    assert new_meta["spm"] == old_meta["spm"]
    assert new_meta["vocab_sizes"] == old_meta["vocab_sizes"]
    train = next(s for s in report.splits if s.name == "train")
    written = sum(int(np.count_nonzero(np.load(tmp_path / "reused" / f"train.{lang}.ids.npy")
                                       == UNK)) for lang in ("en", "de"))
    assert train.kept == 40 and train.unknown_pieces == written > 0  # the strangers

    # Learnt on its own, the same text gives other vocabularies: the option is what matched.
    own = preprocess(PreprocessConfig(
        src_lang="en", tgt_lang="de", out=tmp_path / "own", train=str(other_corpus / "train"),
        spm_model=bin_dir / "spm.model"))
    assert own.vocab_sizes != report.vocab_sizes


def test_a_monolingual_corpus_takes_one_side_of_a_parallel_corpus(bin_dir, other_corpus,
                                                                  tmp_path):
    preprocess(PreprocessConfig(src_lang="de", tgt_lang="de", out=tmp_path / "lm",
                                train=str(other_corpus / "train"), mono=True, vocab_from=bin_dir))
    german = load_vocabularies(bin_dir, load_meta(bin_dir))[1]
    lm = load_vocabularies(tmp_path / "lm", load_meta(tmp_path / "lm"))[0]
    assert lm == german


def test_a_model_trained_on_the_reused_vocabularies_ensembles_with_the_first(
        bin_dir, trained_checkpoint, other_corpus, corpus_dir, tmp_path):
    """The user's path, through the CLI: preprocess a second corpus with --vocab-from,
    train on it, translate with both models as one ensemble."""
    out = tmp_path / "bin"
    result = run_rnmt("preprocess", "-s", "en", "-t", "de", "--train", str(other_corpus / "train"),
                      "--valid", str(corpus_dir / "valid"), "--out", str(out),
                      "--vocab-from", str(bin_dir), check=True)
    assert "<unk> pieces" in result.stderr.decode()
    run_rnmt("train", str(out), "--save-dir", str(tmp_path / "run"), "--max-steps", "2",
             "--max-tokens", "800", "--device", "cpu", "--no-plot", *TINY_MODEL_FLAGS,
             check=True)
    sources = (corpus_dir / "test.en").read_text(encoding="utf-8").splitlines()[:5]
    result = run_rnmt("translate", "-m", str(trained_checkpoint), "-m",
                      str(tmp_path / "run" / "last.pt"), "--beam", "2",
                      stdin="".join(s + "\n" for s in sources), check=True)
    assert len(result.stdout.decode().splitlines()) == 5


def test_vocab_from_names_what_it_ignores(bin_dir, other_corpus, tmp_path):
    result = run_rnmt("preprocess", "-s", "en", "-t", "de", "--train", str(other_corpus / "train"),
                      "--out", str(tmp_path / "bin"), "--vocab-from", str(bin_dir),
                      "--vocab-size", "500", check=True)
    warnings = [line for line in result.stderr.decode().splitlines() if "warning" in line]
    assert warnings == ["rnmt: warning: --vocab-size not used: --vocab-from's vocabularies are "
                        "used as they are"]


@pytest.mark.parametrize("options,needles", [
    (["--spm-model", "SPM"], ["--vocab-from", "--spm-model"]),
    (["-t", "fr"], ["no fr vocabulary", "en, de"]),
    (["--joined-dictionary"], ["--joined-dictionary", "not joined"]),
], ids=["with --spm-model", "a language it lacks", "joined from separate"])
def test_vocab_from_refuses_what_it_cannot_honour(bin_dir, other_corpus, tmp_path, options,
                                                  needles):
    (other_corpus / "train.fr").write_text(
        (other_corpus / "train.de").read_text(encoding="utf-8"), encoding="utf-8")
    options = [str(bin_dir / "spm.model") if o == "SPM" else o for o in options]
    args = ["preprocess", "-s", "en", "-t", "de", "--train", str(other_corpus / "train"),
            "--out", str(tmp_path / "bin"), "--vocab-from", str(bin_dir)]
    if "-t" in options:
        args = args[:3] + args[5:]  # the given -t replaces -t de
    assert_one_line_error(run_rnmt(*args, *options), *needles)
    assert not (tmp_path / "bin" / "meta.json").exists()


def test_vocab_from_a_directory_that_is_no_corpus_is_a_one_line_error(other_corpus, tmp_path):
    result = run_rnmt("preprocess", "-s", "en", "-t", "de", "--train",
                      str(other_corpus / "train"), "--out", str(tmp_path / "bin"),
                      "--vocab-from", str(tmp_path))
    assert_one_line_error(result, "not a preprocessed corpus")
