"""Commands that would lose work or mislead in silence: each refuses in one line (exit 2),
or does what the documentation promises. Driven as a user drives them: subprocesses."""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import RNMT, TINY_MODEL_FLAGS, assert_one_line_error, run_rnmt
from rnmt.checkpoint import load_checkpoint, save_checkpoint
from rnmt.errors import ConfigError
from rnmt.optim import build_optimizer
from rnmt.training import TrainConfig


def _train(bin_dir, save_dir, *extra: str) -> subprocess.CompletedProcess:
    return run_rnmt("train", str(bin_dir), "--save-dir", str(save_dir), "--device", "cpu",
                    "--threads", "1", "--no-plot", *TINY_MODEL_FLAGS, *extra)


# --- train: a save directory of another run ------------------------------------------


def test_a_new_run_never_overwrites_the_checkpoints_of_another(bin_dir, tmp_path):
    _train(bin_dir, tmp_path, "--max-steps", "3", "--max-tokens", "800")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    result = _train(bin_dir, tmp_path, "--max-steps", "3", "--max-tokens", "800")
    assert_one_line_error(result, "--resume", "--overwrite", str(tmp_path))
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    assert after == before  # not a byte of the old run changed, metrics.jsonl included


@pytest.mark.skipif(sys.platform == "win32", reason="the run lock is a POSIX flock")
def test_a_second_run_into_a_save_dir_in_use_is_refused(bin_dir, tmp_path):
    run, log = tmp_path / "run", tmp_path / "first.log"
    with open(log, "wb") as sink:  # a file, not a pipe nobody reads while it trains
        first = subprocess.Popen(
            RNMT + ["train", str(bin_dir), "--save-dir", str(run), "--device", "cpu",
                    "--threads", "1", "--no-plot", *TINY_MODEL_FLAGS, "--max-tokens", "800",
                    "--max-steps", "100000", "--save-every", "100000"],
            stdout=subprocess.DEVNULL, stderr=sink)
    try:
        deadline = time.monotonic() + 120
        while not (run / "metrics.jsonl").exists():  # written once the lock is held
            assert first.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        # --overwrite would have deleted the running run's files; --resume found no last.pt
        # yet or one being rewritten under it.
        result = _train(bin_dir, run, "--overwrite", "--max-steps", "2")
        assert_one_line_error(result, "is in use by another rnmt train",
                              f"(pid {first.pid})")
        assert (run / "metrics.jsonl").exists() and first.poll() is None
    finally:
        first.send_signal(signal.SIGTERM)  # saves last.pt, then exits 130
        first.wait(timeout=120)
    assert first.returncode == 130, log.read_text()
    # The lock went with the process: the run continues in the same directory.
    again = _train(bin_dir, run, "--resume", "--max-epochs", "1")
    assert again.returncode == 0, again.stderr.decode()


def test_overwrite_starts_a_new_run_over_the_old_one(bin_dir, tmp_path):
    _train(bin_dir, tmp_path, "--max-steps", "4", "--max-tokens", "800", "--log-every", "1",
           "--save-every", "2", "--keep-last", "5")
    assert (tmp_path / "checkpoint_4.pt").exists()
    result = _train(bin_dir, tmp_path, "--max-steps", "2", "--max-tokens", "800",
                    "--log-every", "1", "--overwrite")
    assert result.returncode == 0, result.stderr.decode()
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2]  # no old lines
    assert not list(tmp_path.glob("checkpoint_*.pt"))  # the old run's are gone
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 2
    assert "overwrite" not in json.loads((tmp_path / "config.json").read_text())


# --- train --resume: the run continues with its own options ----------------------------


def test_resume_with_only_a_new_limit_continues_with_the_runs_options(bin_dir, tmp_path):
    # what the Ctrl-C handler prints: `rnmt train DATA --save-dir D --resume`, plus a limit
    options = ["--max-tokens", "600", "--lr", "0.004", "--optimizer", "adamw"]
    straight = _train(bin_dir, tmp_path / "a", "--max-steps", "40", *options)
    assert straight.returncode == 0, straight.stderr.decode()
    first = _train(bin_dir, tmp_path / "b", "--max-steps", "20", *options)
    assert first.returncode == 0, first.stderr.decode()
    resumed = run_rnmt("train", str(bin_dir), "--save-dir", str(tmp_path / "b"), "--resume",
                       "--max-steps", "40")
    assert resumed.returncode == 0, resumed.stderr.decode()
    config = json.loads((tmp_path / "b" / "config.json").read_text())
    assert (config["max_tokens"], config["lr"], config["optimizer"]) == (600, 0.004, "adamw")
    assert config["threads"] == 1 and config["max_steps"] == 40
    a = load_checkpoint(tmp_path / "a" / "last.pt")
    b = load_checkpoint(tmp_path / "b" / "last.pt")
    assert b["step"] == 40
    for name, p in a["model"].items():
        assert torch.equal(p, b["model"][name]), name


# --- translate: files -------------------------------------------------------------------


def test_translate_reads_a_gzip_input_file(trained_checkpoint, tmp_path):
    (tmp_path / "in.txt.gz").write_bytes(gzip.compress(b"one\ntwo hundred\n"))
    (tmp_path / "in.txt").write_text("one\ntwo hundred\n")
    plain = run_rnmt("translate", "-m", str(trained_checkpoint), "--beam", "2", "--threads",
                     "1", "-i", str(tmp_path / "in.txt"), check=True)
    packed = run_rnmt("translate", "-m", str(trained_checkpoint), "--beam", "2", "--threads",
                      "1", "-i", str(tmp_path / "in.txt.gz"), check=True)
    assert packed.stdout == plain.stdout and len(plain.stdout.splitlines()) == 2
    assert b"warning" not in packed.stderr  # compressed bytes read as text: invalid UTF-8


def test_translate_refuses_to_write_over_its_input(trained_checkpoint, tmp_path):
    text = tmp_path / "in.txt"
    text.write_text("one\ntwo hundred\n")
    alias = tmp_path / "sub" / ".." / "in.txt"
    (tmp_path / "sub").mkdir()
    result = run_rnmt("translate", "-m", str(trained_checkpoint), "-i", str(text),
                      "-o", str(alias))
    assert_one_line_error(result, "same file")
    assert text.read_text() == "one\ntwo hundred\n"


def test_translate_to_a_full_disk_is_one_line_error(trained_checkpoint):
    with open("/dev/full", "wb") as full:
        result = subprocess.run(
            RNMT + ["translate", "-m", str(trained_checkpoint), "--threads", "1"],
            input=b"one\ntwo\n", stdout=full, stderr=subprocess.PIPE, timeout=120)
    assert_one_line_error(result, "cannot write output: No space left on device")


def test_translate_with_stdin_closed_is_one_line_error(trained_checkpoint):
    # `rnmt translate <&-`: the child starts without a file descriptor 0 at all.
    result = subprocess.run(
        RNMT + ["translate", "-m", str(trained_checkpoint), "--threads", "1"],
        capture_output=True, preexec_fn=lambda: os.close(0), timeout=120)
    assert_one_line_error(result, "stdin or stdout is closed")


@pytest.mark.parametrize("options, needle", [
    (["--threads", "-1"], "--threads"),
    (["--threads", "100000"], "--threads"),  # libgomp aborted the process
    (["--unk-penalty", "nan"], "--unk-penalty"),
    (["--max-len-a", "nan"], "--max-len-a"),
    (["--max-len", "1"], "--max-len"),
    (["--sample", "--temperature", "inf"], "--temperature"),
    (["--length-penalty", "1000"], "--length-penalty"),  # an OverflowError traceback
    (["--output-format", "xml"], "--output-format"),
    (["--errors", "ignore"], "--errors"),
    (["--batch-size", "0"], "--batch-size"),
    (["--buffer-size", "0"], "--buffer-size"),
])
def test_translate_refuses_impossible_options(trained_checkpoint, options, needle):
    result = run_rnmt("translate", "-m", str(trained_checkpoint), *options, stdin="one\n")
    assert_one_line_error(result, needle)
    assert not result.stdout


def test_sizes_past_the_machines_memory_are_one_line_errors(trained_checkpoint, bin_dir,
                                                            tmp_path):
    # Beyond any machine's address space (128 PiB with 5-level paging), so the allocation
    # fails whatever the overcommit policy; each was a RuntimeError traceback.
    result = run_rnmt("translate", "-m", str(trained_checkpoint), "--beam", str(10**17),
                      stdin="one\n")
    assert_one_line_error(result, "out of memory", "GiB asked for")
    # Over a batch of rows, the size itself overflows before any allocation is tried.
    result = run_rnmt("translate", "-m", str(trained_checkpoint), "--beam", str(10**17),
                      stdin="one two\n" * 70)
    assert_one_line_error(result, "out of memory")
    result = _train(bin_dir, tmp_path / "run", "--emb-dim", str(10**15))
    assert_one_line_error(result, "out of memory", "GiB asked for")


def test_a_failure_in_validation_saves_the_updates_before_it_ends_the_run(bin_dir, tmp_path):
    """The beam of validation is too large for the machine: the first validation (at step
    3) fails. The three updates are in last.pt (they were lost before), and --resume with a
    beam that fits finishes the run."""
    run = tmp_path / "run"
    result = _train(bin_dir, run, "--max-tokens", "400", "--valid-every", "3",
                    "--max-steps", "6", "--valid-bleu", "--valid-beam", str(10**17))
    err = result.stderr.decode()
    assert result.returncode == 2 and "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("rnmt: error:")]
    assert len(errors) == 1 and "out of memory" in errors[0], err
    assert f"saved {run / 'last.pt'} (continue with --resume)" in err
    saved = load_checkpoint(run / "last.pt")["training"]["state"]
    assert saved["step"] == 3
    result = _train(bin_dir, run, "--resume", "--valid-beam", "1")
    assert result.returncode == 0, result.stderr.decode()
    assert load_checkpoint(run / "last.pt")["training"]["state"]["step"] == 6


@pytest.mark.parametrize("options", [["--max-len-b", "-50"], ["--max-len-a", "1e30"]])
def test_an_extreme_length_limit_still_allows_one_piece(trained_checkpoint, options):
    result = run_rnmt("translate", "-m", str(trained_checkpoint), "--threads", "1",
                      "--output-format", "json", *options, stdin="one\ntwo hundred\n")
    assert result.returncode == 0, result.stderr.decode()
    assert all(json.loads(line)["pieces"] for line in result.stdout.splitlines())


# --- average -----------------------------------------------------------------------------


def test_average_never_writes_over_its_inputs_or_the_runs_last_checkpoint(bin_dir, tmp_path):
    _train(bin_dir, tmp_path, "--max-steps", "4", "--max-tokens", "800", "--save-every", "2",
           "--keep-last", "2")
    last = (tmp_path / "last.pt").read_bytes()
    for args in (["-o", str(tmp_path / "last.pt"), "--last", "2", "--save-dir", str(tmp_path)],
                 [str(tmp_path / "checkpoint_2.pt"), str(tmp_path / "checkpoint_4.pt"),
                  "-o", str(tmp_path / "checkpoint_2.pt")]):
        assert_one_line_error(run_rnmt("average", *args), "another file")
    assert (tmp_path / "last.pt").read_bytes() == last
    assert_one_line_error(run_rnmt("average", "--last", "-2", "--save-dir", str(tmp_path),
                                    "-o", str(tmp_path / "avg.pt")), "--last -2")
    # --last asks for more than the run holds, from a directory that is not there, or
    # without a run directory; a .pt file there that is no training checkpoint
    avg = str(tmp_path / "avg.pt")
    for args, needle in [
        (["--last", "9", "--save-dir", str(tmp_path)], "9 checkpoints of distinct steps asked "
                                                       "for, 2 found"),
        (["--last", "2", "--save-dir", str(tmp_path / "absent")], "no such directory"),
        (["--last", "2"], "--last needs --save-dir"),
        ([], "give checkpoints, or --last N --save-dir DIR"),
    ]:
        assert_one_line_error(run_rnmt("average", *args, "-o", avg), needle)
    stepless = tmp_path / "stepless"
    stepless.mkdir()
    payload = load_checkpoint(tmp_path / "checkpoint_2.pt")
    del payload["step"]
    save_checkpoint(payload, stepless / "a.pt")
    assert_one_line_error(run_rnmt("average", "--last", "1", "--save-dir", str(stepless),
                                    "-o", avg), "a.pt: checkpoint stores no training step")
    assert not (tmp_path / "avg.pt").exists()
    # An output that exists but is no checkpoint of ours holds nothing to resume: replaced.
    (stepless / "notes.txt").write_text("notes\n")
    run_rnmt("average", "--last", "2", "--save-dir", str(tmp_path), "-o",
             str(stepless / "notes.txt"), check=True)
    assert "model" in load_checkpoint(stepless / "notes.txt")
    # An average written into the run is not among the run's checkpoints the next time:
    # it holds the step of the newest, and stood in for it.
    run_rnmt("average", "--last", "2", "--save-dir", str(tmp_path), "-o", avg, check=True)
    again = run_rnmt("average", "--last", "1", "--save-dir", str(tmp_path), "-o",
                     str(tmp_path / "avg2.pt"), check=True)
    assert "averaged 1 checkpoints" in again.stdout.decode()
    (source,) = load_checkpoint(tmp_path / "avg2.pt")["averaged_from"]
    assert source != avg and load_checkpoint(source)["step"] == 4



@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux's /dev/full")
def test_a_metrics_log_on_a_full_disk_is_a_warning_and_training_goes_on(bin_dir, tmp_path):
    # /dev/full fails every write with ENOSPC, as a full disk does.
    tmp_path.joinpath("metrics.jsonl").symlink_to("/dev/full")
    result = _train(bin_dir, tmp_path, "--max-steps", "4", "--log-every", "1")
    err = result.stderr.decode()
    assert result.returncode == 0 and "Traceback" not in err, err
    assert err.count("cannot write") == 1 and "No space left on device" in err
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 4  # the work is kept


def test_outputs_where_a_file_is_in_the_way_are_one_line_errors(trained_checkpoint, tmp_path):
    (tmp_path / "a-file").write_text("")
    result = run_rnmt("average", str(trained_checkpoint), "-o", str(tmp_path / "a-file" / "x.pt"))
    assert_one_line_error(result, "cannot save checkpoint", "a-file")  # was a traceback
    if importlib.util.find_spec("matplotlib") is not None:
        result = run_rnmt("translate", "-m", str(trained_checkpoint), "--attention-plot",
                          str(tmp_path / "a-file"), stdin="one\n")
        assert_one_line_error(result, "--attention-plot", "not a directory")


def test_average_refuses_checkpoints_of_different_models(trained_checkpoint, tmp_path):
    payload = load_checkpoint(trained_checkpoint)
    model = payload["model"]
    name = next(k for k, v in model.items() if v.dim() == 2)
    others = {
        "config": dict(payload, model_config={**payload["model_config"], "dropout": 0.5}),
        "vocab": dict(payload, tgt_vocab={**payload["tgt_vocab"], "pieces": ["x"]}),
        "keys": dict(payload, model={k: v for k, v in model.items() if k != name}),
        "shape": dict(payload, model={**model, name: model[name][:, :1]}),
    }
    needles = {"config": "model_config differs", "vocab": "tgt_vocab differs",
               "keys": "parameters differ", "shape": f"parameter {name} has shape"}
    for kind, other in others.items():
        save_checkpoint(other, tmp_path / f"{kind}.pt")
        result = run_rnmt("average", str(trained_checkpoint), str(tmp_path / f"{kind}.pt"),
                          "-o", str(tmp_path / "avg.pt"))
        assert_one_line_error(result, f"{kind}.pt", needles[kind])
    assert not (tmp_path / "avg.pt").exists()

# --- bad paths and numbers for train and preprocess ---------------------------------------


def test_train_refuses_bad_paths_and_threads_in_one_line(bin_dir, corpus_dir, tmp_path):
    (tmp_path / "a-file").write_text("")
    assert_one_line_error(run_rnmt("train", str(corpus_dir / "train.en"), "--save-dir",
                                    str(tmp_path / "d")), "not a preprocessed corpus")
    assert_one_line_error(run_rnmt("train", str(bin_dir), "--save-dir",
                                    str(tmp_path / "a-file")), "not a directory")
    assert_one_line_error(run_rnmt("train", str(bin_dir), "--save-dir", str(tmp_path / "t"),
                                    "--threads", "-1"), "--threads")


@pytest.mark.parametrize("options", [
    ["--seed", "-5"], ["--max-sentences", "-1"],  # tracebacks from numpy
    ["--layers", "1000000000"],  # built layers for hours
])
def test_train_refuses_option_values_that_crashed_or_hung_it(bin_dir, tmp_path, options):
    assert_one_line_error(_train(bin_dir, tmp_path / "run", *options), options[0][2:])
    assert not (tmp_path / "run" / "last.pt").exists()


@pytest.mark.parametrize("options, needle", [
    # each of these trained nothing, or trained otherwise than asked, without a word
    (dict(max_epochs=0), "--max-epochs"),
    (dict(max_time=0.0), "--max-time"),
    (dict(max_time=float("nan")), "--max-time"),
    (dict(clip_norm=-1.0), "--clip-norm"),
    (dict(clip_norm=float("nan")), "--clip-norm"),
    (dict(lr=float("nan")), "--lr"),
    (dict(weight_decay=float("nan")), "--weight-decay"),
    (dict(min_lr=float("nan")), "--min-lr"),
    (dict(lr=1e-3, min_lr=1e-2), "--min-lr 0.01 must be below --lr 0.001"),
    (dict(threads=100_000), "--threads"),
    (dict(resume=True, overwrite=True), "give one of them"),
    (dict(best_metric="bleu4"), "unknown --best-metric 'bleu4'"),
    (dict(early_stop_metric="loss"), "unknown --early-stop-metric 'loss'"),
    (dict(update_freq=0), "--update-freq"),
    (dict(label_smoothing=1.0), "--label-smoothing"),
    (dict(valid_beam=0), "--valid-beam"),
    (dict(keep_last=-1), "--keep-last"),
])
def test_training_option_values_that_would_run_wrong_are_refused(tmp_path, options, needle):
    def build() -> None:
        config = TrainConfig(save_dir=tmp_path, **options)
        config.schedule()
        build_optimizer(config.optimizer, [torch.nn.Parameter(torch.zeros(1))], config.lr,
                        config.weight_decay)

    with pytest.raises(ConfigError) as caught:
        build()
    assert needle in str(caught.value)


def test_preprocess_refuses_an_empty_valid_split_and_bad_options(corpus_dir, tmp_path):
    (tmp_path / "v.en").write_text("")
    (tmp_path / "v.de").write_text("")
    (tmp_path / "a-file").write_text("")
    base = ["preprocess", "-s", "en", "-t", "de", "--train", str(corpus_dir / "train")]
    assert_one_line_error(run_rnmt(*base, "--valid", str(tmp_path / "v"), "--out",
                                    str(tmp_path / "b")), "v.en: validation data is empty")
    assert_one_line_error(run_rnmt(*base, "--out", str(tmp_path / "a-file")), "not a directory")
    assert_one_line_error(run_rnmt(*base, "--out", str(tmp_path / "c"), "--vocab-size", "0"),
                           "--vocab-size")
    for option, value in (("--errors", "ignore"), ("--threads", "2000")):  # were tracebacks
        assert_one_line_error(run_rnmt(*base, "--out", str(tmp_path / "c"), option, value),
                               option)
    # Fewer pieces than the text has characters (sentencepiece's RuntimeError traceback),
    # or than the special pieces.
    assert_one_line_error(run_rnmt(*base, "--out", str(tmp_path / "c"), "--vocab-size", "8"),
                          "--vocab-size 8 is too small for this text", "choose at least")
    assert_one_line_error(run_rnmt(*base, "--out", str(tmp_path / "c"), "--vocab-size", "3"),
                          "--vocab-size 3: sentencepiece needs more than the 4 special pieces")
    assert not (tmp_path / "c").exists()


def test_preprocess_of_one_language_refuses_what_needs_two(corpus_dir, tmp_path):
    (tmp_path / "e.en").write_text("")
    out = ["--out", str(tmp_path / "m")]
    mono = ["preprocess", "--mono", "-l", "en", "--train", str(corpus_dir / "train"), *out]
    for args, needle in [
        (["preprocess", "-s", "en", "-t", "en", "--train", str(corpus_dir / "train"), *out],
         "source and target language are both 'en'"),
        (["preprocess", "--mono", "-s", "en", "-t", "de", "--train", str(corpus_dir / "train"),
          *out], "--mono takes one language: give -l/--lang, not -s/-t"),
        ([*mono, "--separate-vocab"], "--separate-vocab needs two languages"),
        (["preprocess", "--mono", "-l", "en", "--train", str(tmp_path / "e"), *out],
         "e.en: training data is empty"),
        ([*mono, "--valid", str(tmp_path / "e")], "e.en: validation data is empty"),
    ]:
        assert_one_line_error(run_rnmt(*args), needle)
    assert not (tmp_path / "m").exists()


def test_training_on_a_corpus_without_a_validation_split_says_how_to_make_one(corpus_dir,
                                                                             tmp_path):
    run_rnmt("preprocess", "-s", "en", "-t", "de", "--train", str(corpus_dir / "train"),
             "--out", str(tmp_path / "bin"), "--vocab-size", "100", check=True)
    result = _train(tmp_path / "bin", tmp_path / "run", "--max-steps", "2")
    # It was "missing binarised data: …/valid.en.ids.npy".
    assert_one_line_error(result, "no valid split; run rnmt preprocess with --valid PREFIX")
    assert not (tmp_path / "run").exists()


def test_a_language_model_corpus_can_reuse_a_sentencepiece_model(bin_dir, corpus_dir, tmp_path):
    """`preprocess --mono --spm-model`: the monolingual corpus cut into the pieces of a
    translation corpus's model (for a language model that shares its segmentation)."""
    quiet = run_rnmt("preprocess", "--mono", "-l", "de", "--train", str(corpus_dir / "train"),
                     "--out", str(tmp_path / "lm"), "--spm-model", str(bin_dir / "spm.model"),
                     check=True)
    assert (tmp_path / "lm" / "spm.model").read_bytes() == (bin_dir / "spm.model").read_bytes()
    meta = json.loads((tmp_path / "lm" / "meta.json").read_text())
    assert meta["splits"]["train"]["kept"] > 0
    assert b"warning" not in quiet.stderr


def test_options_for_a_new_sentencepiece_model_are_named_when_one_is_given(bin_dir, corpus_dir,
                                                                           tmp_path):
    """With --spm-model the model is used as it is: options that would shape a new one
    are not used, and a warning names those given (they were ignored in silence)."""
    result = run_rnmt("preprocess", "-s", "en", "-t", "de", "--train", str(corpus_dir / "train"),
                      "--out", str(tmp_path / "bin"), "--spm-model", str(bin_dir / "spm.model"),
                      "--vocab-size", "50", "--separate-vocab", check=True)
    warnings = [line for line in result.stderr.decode().splitlines() if "warning" in line]
    assert warnings == ["rnmt: warning: --vocab-size, --separate-vocab not used: --spm-model "
                        "is used as it is, for both languages"]
    assert (tmp_path / "bin" / "spm.model").read_bytes() == (bin_dir / "spm.model").read_bytes()
    assert not (tmp_path / "bin" / "spm.en.model").exists()


def test_preprocess_onto_a_full_disk_is_one_error_and_leaves_no_corpus(corpus_dir, tmp_path,
                                                                        monkeypatch):
    from pathlib import Path

    from rnmt.errors import DataError
    from rnmt.preprocess import PreprocessConfig, preprocess

    write_text = Path.write_text

    def disk_full(self, *args, **kwargs):
        if self.name.startswith("vocab."):
            raise OSError(28, "No space left on device")  # no file name, as write() gives
        return write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", disk_full)
    out = tmp_path / "bin"
    with pytest.raises(DataError) as caught:  # it was an OSError traceback
        preprocess(PreprocessConfig(src_lang="en", tgt_lang="de", out=out, vocab_size=200,
                                    train=str(corpus_dir / "train")))
    assert str(caught.value) == (f"--out {out}: cannot write (No space left on device); "
                                 f"{out} holds no usable corpus")
    assert not (out / "meta.json").exists()


# --- train: a damaged data directory --------------------------------------------------


def _damaged_copy(bin_dir, tmp_path):
    copy = tmp_path / "bin"
    shutil.copytree(bin_dir, copy)
    return copy


def test_train_refuses_a_damaged_vocabulary_or_meta_file_in_one_line(bin_dir, tmp_path):
    broken = _damaged_copy(bin_dir, tmp_path)
    meta = json.loads((broken / "meta.json").read_text())
    spm = next(iter(meta["spm"].values()))
    (broken / spm).write_text("x")  # not a sentencepiece model
    assert_one_line_error(_train(broken, tmp_path / "run"), "vocabulary")
    (broken / "meta.json").write_text("[]")  # JSON, but not a description
    assert_one_line_error(_train(broken, tmp_path / "run"), "meta.json")


def test_train_refuses_ids_beyond_the_vocabulary_before_the_first_update(bin_dir, tmp_path):
    broken = _damaged_copy(bin_dir, tmp_path)
    meta = json.loads((broken / "meta.json").read_text())
    path = broken / f"train.{meta['tgt_lang']}.ids.npy"
    ids = np.load(path)
    ids[len(ids) // 2] = 10**6  # a stray id, as from vocab files of another preprocess run
    np.save(path, ids)
    result = _train(broken, tmp_path / "run", "--max-steps", "50")
    assert_one_line_error(result, f"train.{meta['tgt_lang']}", "1000000")
    assert not (tmp_path / "run" / "last.pt").exists()  # refused before any work


@pytest.mark.parametrize("damage, needle", [
    ("truncated", "not a complete flat array"),  # a copy or a disk that ran out
    ("garbage", "corrupt binarised data"),
    ("offsets", "the offsets point past the ids"),
    ("missing", "missing binarised data"),
])
def test_train_refuses_damaged_binarised_data_in_one_line(bin_dir, tmp_path, damage, needle):
    broken = _damaged_copy(bin_dir, tmp_path)
    prefix = f"train.{json.loads((broken / 'meta.json').read_text())['tgt_lang']}"
    ids, offsets = broken / f"{prefix}.ids.npy", broken / f"{prefix}.offsets.npy"
    if damage == "truncated":
        ids.write_bytes(ids.read_bytes()[: ids.stat().st_size // 2])
    elif damage == "garbage":
        ids.write_bytes(b"no array here" * 100)
    elif damage == "offsets":
        ends = np.load(offsets)
        ends[-1] += 10
        np.save(offsets, ends)
    else:
        offsets.unlink()
    assert_one_line_error(_train(broken, tmp_path / "run"), needle, prefix)
    assert not (tmp_path / "run" / "last.pt").exists()


def _other_pieces(corpus_dir, out):
    """The same corpus cut into other pieces (a smaller sentencepiece vocabulary)."""
    from rnmt.preprocess import PreprocessConfig, preprocess

    preprocess(PreprocessConfig(src_lang="en", tgt_lang="de", out=out,
                                train=str(corpus_dir / "train"), valid=str(corpus_dir / "valid"),
                                vocab_size=200))
    return out


def test_train_refuses_a_sentencepiece_model_of_another_run(bin_dir, corpus_dir, tmp_path):
    broken = _damaged_copy(bin_dir, tmp_path)
    other = _other_pieces(corpus_dir, tmp_path / "other-bin")
    spm = next(iter(json.loads((broken / "meta.json").read_text())["spm"].values()))
    shutil.copy(other / spm, broken / spm)  # the vocab files still list this run's pieces
    assert_one_line_error(_train(broken, tmp_path / "run"), "is not in the sentencepiece model")


def test_resume_needs_a_resumable_last_checkpoint_of_this_data(bin_dir, corpus_dir, tmp_path):
    assert_one_line_error(_train(bin_dir, tmp_path / "none", "--resume"),
                          "last.pt does not exist")
    _train(bin_dir, tmp_path / "run", "--max-steps", "2", "--max-tokens", "800")
    last = load_checkpoint(tmp_path / "run" / "last.pt")
    # The same corpus cut into other pieces: the run's embeddings would mean other pieces.
    other = _other_pieces(corpus_dir, tmp_path / "other-bin")
    assert_one_line_error(_train(other, tmp_path / "run", "--resume", "--max-steps", "4"),
                          "trained on another vocabulary")
    # A last.pt without the run's state (e.g. an average or best.pt copied over it).
    without = {"training": "holds no training state", "train_config": "holds no training options"}
    for key, needle in without.items():
        save_checkpoint({k: v for k, v in last.items() if k != key}, tmp_path / key / "last.pt")
        assert_one_line_error(_train(bin_dir, tmp_path / key, "--resume"), needle)
    assert load_checkpoint(tmp_path / "run" / "last.pt")["step"] == 2


@pytest.mark.skipif(importlib.util.find_spec("MeCab") is not None,
                    reason="MeCab is installed here: ja-mecab works")
def test_score_with_a_tokenizer_whose_extra_is_missing_is_one_line_error(tmp_path):
    (tmp_path / "ref.txt").write_text("a b\n")
    result = run_rnmt("score", "--ref", str(tmp_path / "ref.txt"), "--tokenize", "ja-mecab",
                      stdin="a b\n")
    assert_one_line_error(result, "--tokenize ja-mecab", "sacrebleu[ja]")


def test_resume_refuses_to_change_the_model_instead_of_ignoring_it(bin_dir, tmp_path):
    _train(bin_dir, tmp_path, "--max-steps", "2", "--max-tokens", "800")
    result = _train(bin_dir, tmp_path, "--max-steps", "4", "--resume", "--cell", "gru",
                    "--dropout", "0.5")
    assert_one_line_error(result, "--resume", "--cell gru (the run's: lstm)", "--dropout 0.5")
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 2
    # The run's own model options given again are no change: it continues.
    again = _train(bin_dir, tmp_path, "--max-steps", "3", "--resume", "--cell", "lstm")
    assert again.returncode == 0, again.stderr.decode()
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 3


def test_alignment_from_a_model_without_attention_is_refused(bin_dir, tmp_path):
    """A seq2seq model has no attention weights: --alignment printed an empty column and
    --attention-plot empty plots; both are refused in one line now."""
    trained = _train(bin_dir, tmp_path, "--arch", "seq2seq", "--max-steps", "1",
                     "--max-tokens", "800")
    assert trained.returncode == 0, trained.stderr.decode()
    for option in (["--alignment"], ["--attention-plot", str(tmp_path / "plots")]):
        result = run_rnmt("translate", "-m", str(tmp_path / "last.pt"), *option,
                          stdin="eins zwei\n")
        assert_one_line_error(result, option[0], "attention", "last.pt")
    assert not (tmp_path / "plots").exists()


@pytest.mark.parametrize("arch", ["seq2seq", "lm"])
def test_train_refuses_an_attention_score_for_a_model_without_attention(bin_dir, tmp_path,
                                                                        arch):
    """`--arch seq2seq --attention dot` trained a model without attention in silence."""
    result = _train(bin_dir, tmp_path, "--max-steps", "1", "--arch", arch, "--attention", "dot")
    assert_one_line_error(result, "--attention dot", f"--arch {arch} has no attention")
    assert not (tmp_path / "last.pt").exists()


def test_a_runs_own_config_json_stays_a_valid_config(bin_dir, tmp_path):
    """A seq2seq run's config.json holds every option, attention at its default."""
    first = _train(bin_dir, tmp_path / "a", "--arch", "seq2seq", "--max-steps", "1",
                   "--max-tokens", "800")
    assert first.returncode == 0, first.stderr.decode()
    again = run_rnmt("train", "--config", str(tmp_path / "a" / "config.json"),
                     "--save-dir", str(tmp_path / "b"), "--max-steps", "1")
    assert again.returncode == 0, again.stderr.decode()


# --- preprocess: vocabularies ------------------------------------------------------------


def test_separate_vocab_learns_one_sentencepiece_model_per_language(corpus_dir, tmp_path):
    base = ["preprocess", "-s", "en", "-t", "de", "--train", str(corpus_dir / "train"),
            "--valid", str(corpus_dir / "valid"), "--vocab-size", "120"]
    result = run_rnmt(*base, "--out", str(tmp_path / "bin"), "--separate-vocab")
    assert result.returncode == 0, result.stderr.decode()
    meta = json.loads((tmp_path / "bin" / "meta.json").read_text())
    assert meta["spm"] == {"en": "spm.en.model", "de": "spm.de.model"}
    pieces = {lang: set(json.loads((tmp_path / "bin" / f"vocab.{lang}.json").read_text()))
              for lang in ("en", "de")}
    assert "▁hundred" in pieces["en"] and "▁hundred" not in pieces["de"]
    assert any("hundert" in p for p in pieces["de"])
    assert not any("hundert" in p for p in pieces["en"])
    assert _train(tmp_path / "bin", tmp_path / "run", "--max-steps", "2").returncode == 0
    out = run_rnmt("translate", "-m", str(tmp_path / "run" / "last.pt"), "--threads", "1",
                   stdin="two hundred\nseven\n")
    assert out.returncode == 0 and len(out.stdout.decode().splitlines()) == 2
    assert_one_line_error(run_rnmt(*base, "--out", str(tmp_path / "j"), "--separate-vocab",
                                    "--joined-dictionary"), "one sentencepiece model")


def test_preprocess_refuses_a_bad_model_type_or_sentencepiece_file(corpus_dir, tmp_path):
    (tmp_path / "not-spm.model").write_text("hello")
    base = ["preprocess", "-s", "en", "-t", "de", "--train", str(corpus_dir / "train")]
    for extra, needle in ((["--model-type", "wordpiece"], "unknown --model-type 'wordpiece'"),
                          (["--spm-model", str(tmp_path / "absent.model")],
                           "cannot read sentencepiece model"),
                          (["--spm-model", str(tmp_path / "not-spm.model")],
                           "not a sentencepiece model")):
        assert_one_line_error(run_rnmt(*base, "--out", str(tmp_path / "o"), *extra), needle)
    assert not (tmp_path / "o" / "meta.json").exists()


def test_translate_output_into_a_missing_directory_is_one_line_error(trained_checkpoint,
                                                                      tmp_path):
    target = tmp_path / "absent" / "out.txt"
    result = run_rnmt("translate", "-m", str(trained_checkpoint), "-o", str(target),
                      stdin="one\n")
    assert_one_line_error(result, str(target), "cannot open")
