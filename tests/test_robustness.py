"""Bad input and faults: one clear line and exit 2, never a traceback, never lost work."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import (RNMT, ROOT, TINY_MODEL, TINY_MODEL_FLAGS, assert_one_line_error,
                      load_benchmark, run_rnmt)
from rnmt.checkpoint import load_checkpoint, save_checkpoint
from rnmt.training import SilentReporter

NASTY_LINES = [
    "four hundred twenty-one",
    "",
    "   \t  ",
    "nine " * 2500,  # 12,500 characters
    "\x01\x02\x03\x7f",
    "seven hundred five\r",  # a \r\n ending
    "\ufeffthree",  # a stray BOM inside the text
]


def test_translate_keeps_line_count_on_nasty_lines(trained_checkpoint):
    text = "\n".join(NASTY_LINES)  # and no final newline
    result = run_rnmt("translate", "-m", str(trained_checkpoint), "--beam", "2",
                      "--max-len-a", "0.1", "--max-len-b", "5", stdin=b"\xef\xbb\xbf" + text.encode())
    assert result.returncode == 0, result.stderr.decode()
    out = result.stdout.decode().split("\n")
    assert out[-1] == "" and len(out) - 1 == len(NASTY_LINES)
    assert out[1] == "" and out[2] == ""
    assert len(out[3].split()) <= 5 + 2  # bounded by --max-len-a/b, whatever the input


def test_translate_replaces_invalid_utf8_by_default(trained_checkpoint):
    result = run_rnmt("translate", "-m", str(trained_checkpoint), "--beam", "1",
                      stdin=b"nine\nni\xffne\nten\n")
    assert result.returncode == 0
    assert len(result.stdout.decode().splitlines()) == 3


@pytest.mark.parametrize("case", ["missing", "empty", "truncated-gz", "directory"])
def test_preprocess_reports_bad_files_in_one_line(tmp_path, case):
    (tmp_path / "c.en").write_text("one\ntwo\n")
    if case == "missing":
        target = "c.de"
    elif case == "empty":
        (tmp_path / "c.de").write_text("")
        (tmp_path / "c.en").write_text("")
        target = "c.en"
    elif case == "truncated-gz":
        (tmp_path / "c.de.gz").write_bytes(gzip.compress(b"eins\nzwei\n" * 500)[:30])
        target = "c.de.gz"
    else:
        (tmp_path / "c.de").mkdir()
        target = "c.de"
    result = run_rnmt("preprocess", "-s", "en", "-t", "de", "--train", str(tmp_path / "c"),
                      "--out", str(tmp_path / "bin"))
    assert_one_line_error(result, target)


def test_preprocess_strict_utf8_names_the_line(tmp_path):
    (tmp_path / "c.en").write_bytes(b"one\ntwo\nthr\xe9e\n")
    (tmp_path / "c.de").write_text("eins\nzwei\ndrei\n")
    result = run_rnmt("preprocess", "-s", "en", "-t", "de", "--train", str(tmp_path / "c"),
                      "--out", str(tmp_path / "bin"), "--errors", "strict")
    assert_one_line_error(result, "c.en", "line 3")


@pytest.mark.parametrize("damage", ["truncated", "not-a-checkpoint", "foreign-torch-file"])
def test_translate_refuses_damaged_checkpoints(trained_checkpoint, tmp_path, damage):
    path = tmp_path / "model.pt"
    data = trained_checkpoint.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 3])
    elif damage == "not-a-checkpoint":
        path.write_text("hello\n")
    else:
        import torch

        torch.save({"state_dict": {"w": torch.zeros(1)}}, path)
    result = run_rnmt("translate", "-m", str(path), stdin="nine\n")
    assert_one_line_error(result, "model.pt")


@pytest.mark.parametrize("edit, needle", [
    ("vocabulary", "vocabulary sizes do not match the model"),
    ("config", "checkpoint does not match its model"),
])
def test_a_checkpoint_whose_parts_disagree_is_one_line_error(trained_checkpoint, tmp_path,
                                                             edit, needle):
    """Weights, model config and vocabularies of one file that do not fit together (a
    hand-edited checkpoint, or one assembled from two runs): translate and score refuse it
    in one line naming the file."""
    payload = load_checkpoint(trained_checkpoint)
    if edit == "vocabulary":  # the other side's vocabulary, of another size
        payload["tgt_vocab"] = payload["src_vocab"]
    else:
        payload["model_config"] = dict(payload["model_config"], hidden_dim=48)
    path = tmp_path / "model.pt"
    save_checkpoint(payload, path)
    assert_one_line_error(run_rnmt("translate", "-m", str(path), stdin="nine\n"),
                          "model.pt", needle)
    (tmp_path / "x").write_text("nine\n")
    assert_one_line_error(run_rnmt("score", "-m", str(path), "--src", str(tmp_path / "x"),
                                   str(tmp_path / "x"), "--device", "cpu"), "model.pt", needle)


def test_a_malicious_checkpoint_runs_no_code(tmp_path):
    victim = tmp_path / "created-by-pickle"
    evil = tmp_path / "evil.pt"
    code = (
        "import os, torch\n"
        "class E:\n"
        "    def __reduce__(self):\n"
        f"        return (os.system, ('touch {victim}',))\n"
        f"torch.save({{'format': 'rnmt', 'version': 1, 'model': E()}}, r'{evil}')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    result = run_rnmt("translate", "-m", str(evil), stdin="nine\n")
    assert result.returncode == 2 and not victim.exists()


def _train_process(bin_dir, save_dir, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen(
        RNMT + ["train", str(bin_dir), "--save-dir", str(save_dir), "--device", "cpu",
                "--max-tokens", "400", "--log-every", "1", *TINY_MODEL_FLAGS, *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT,
    )


def _wait_for_step(proc: subprocess.Popen, step: int) -> None:
    deadline = time.time() + 120
    assert proc.stderr is not None
    for line in iter(proc.stderr.readline, b""):
        if f"step {step:6d}".encode() in line or time.time() > deadline:
            return


def test_ctrl_c_saves_last_checkpoint_and_resume_finishes(bin_dir, tmp_path):
    proc = _train_process(bin_dir, tmp_path, "--max-steps", "100000")
    _wait_for_step(proc, 5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err.decode()
    assert b"--resume" in err and b"Traceback" not in err
    saved = load_checkpoint(tmp_path / "last.pt")
    assert saved["training"]["state"]["step"] >= 5
    proc = _train_process(bin_dir, tmp_path, "--resume", "--max-steps",
                          str(saved["training"]["state"]["step"] + 3))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()
    assert load_checkpoint(tmp_path / "last.pt")["step"] == saved["training"]["state"]["step"] + 3


def test_ctrl_c_during_translate_keeps_whole_lines_and_exits_130(trained_checkpoint, tmp_path):
    """Ctrl-C in a pipeline: exit 130 with one line on stderr, no traceback, and what
    reached stdout is whole translations, the first lines of the input's, in order."""
    source = tmp_path / "in.en"
    source.write_text("one hundred twenty-three\nseven thousand four\nnine\n" * 7000)
    with source.open("rb") as stdin:
        proc = subprocess.Popen(
            RNMT + ["translate", "-m", str(trained_checkpoint), "--threads", "1",
                    "--buffer-size", "30", "--batch-size", "30", "--beam", "2"],
            stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
        assert proc.stdout is not None
        first = proc.stdout.readline()  # translation has begun
        proc.send_signal(signal.SIGINT)
        # From the same reader: communicate() would read the pipe past what readline()
        # has already buffered.
        rest = proc.stdout.read()
        err = proc.stderr.read()
        proc.wait(timeout=120)
    assert proc.returncode == 130, err.decode()
    assert err.decode().splitlines() == ["rnmt: interrupted"]
    out = (first + rest).decode()
    assert out.endswith("\n")
    lines = out.splitlines()
    assert 1 <= len(lines) < 21000
    # the same three inputs in turn: each output line equals the one three lines before
    assert all(line == lines[i % 3] for i, line in enumerate(lines)), lines[:6]


# ---------------------------------------------------------------------------------------
# Inputs: what preprocess filters, very long lines
# ---------------------------------------------------------------------------------------


def test_preprocess_counts_and_reports_the_lines_it_filters(corpus_dir, bin_dir, tmp_path):
    good_en = (corpus_dir / "train.en").read_text().splitlines()[:40]
    good_de = (corpus_dir / "train.de").read_text().splitlines()[:40]
    odd_en = [b"", b"   \t ", b"\x01\x02\x03\x7f", b"one two", b"nine " * 40, b"bad \xff byte"]
    odd_de = [b"eins", b"zwei", b"drei", b"", b"neun", b"schlecht"]
    # empty, whitespace-only, control-only (no pieces) source; an empty target; too long
    (tmp_path / "c.en").write_bytes(b"\xef\xbb\xbf" + "\r\n".join(good_en).encode() + b"\r\n"
                                    + b"\n".join(odd_en))  # BOM, \r\n, no final newline
    (tmp_path / "c.de").write_bytes("\n".join(good_de).encode() + b"\n" + b"\n".join(odd_de))
    result = run_rnmt("preprocess", "-s", "en", "-t", "de", "--train", str(tmp_path / "c"),
                      "--out", str(tmp_path / "bin"), "--spm-model", str(bin_dir / "spm.model"),
                      "--max-len", "30")
    assert result.returncode == 0, result.stderr.decode()
    report = json.loads((tmp_path / "bin" / "meta.json").read_text())["splits"]["train"]
    # No <unk>: the vocabulary is learnt from this text, and sentencepiece's normalisation
    # drops the U+FFFD that replaced the invalid byte.
    assert report == {"name": "train", "total": 46, "kept": 41, "empty": 4, "too_long": 1,
                      "invalid_utf8_lines": 1, "unknown_pieces": 0}
    row = next(line for line in result.stderr.decode().splitlines() if " train " in line)
    assert row.replace("│", " ").split() == ["train", "46", "41", "4", "1", "1", "0"]


def _run_measured(args: list[str], stdin: bytes, tmp_path) -> tuple[int, bytes, bytes, int]:
    """Run the CLI; return (exit code, stdout, stderr, peak RSS in bytes of that command
    alone: benchmarks/common.py's launcher keeps this session's own peak out of it)."""
    (tmp_path / "in").write_bytes(stdin)
    with open(tmp_path / "in", "rb") as i, open(tmp_path / "out", "wb") as o, \
            open(tmp_path / "err", "wb") as e:
        run = load_benchmark("common").run_child(RNMT + args, threads=1, stdin=i, stdout=o,
                                                 stderr=e)
    return (run.exit_code, (tmp_path / "out").read_bytes(), (tmp_path / "err").read_bytes(),
            int(run.peak_rss_mb * 2**20))


def test_sentences_far_longer_than_training_are_bounded_in_length_and_memory(
        trained_checkpoint, tmp_path):
    long_line = " ".join(["nine hundred twenty-one"] * 1700)  # 5,100 words, ~40,000 chars
    lines = [long_line] * 6 + ["four hundred", "", long_line + " seven"]
    code, out, err, peak = _run_measured(
        ["translate", "-m", str(trained_checkpoint), "--beam", "2", "--device", "cpu",
         "--max-len-a", "0", "--max-len-b", "12", "--min-len", "50"],  # forced to the limit
        ("\n".join(lines) + "\n").encode(), tmp_path)
    assert code == 0, err.decode()
    outputs = out.decode().split("\n")[:-1]
    assert len(outputs) == len(lines) and outputs[7] == ""
    for text in outputs:
        assert len(text.split()) <= 11  # ≤ 11 pieces before </s>: ≤ 11 words
    assert peak < 1.5 * 2**30, f"peak RSS {peak / 2**20:.0f} MiB"
    print(f"peak RSS {peak / 2**20:.0f} MiB")


def test_long_sentences_are_searched_in_batches_within_the_token_budget(trained_checkpoint,
                                                                        monkeypatch):
    import rnmt.translator as translator_module
    from rnmt.search import SearchConfig
    from rnmt.translator import Translator

    shapes: list[tuple[int, int]] = []
    real_search = translator_module.search_nbest

    def recording_search(model, src, *args, **kwargs):
        shapes.append(tuple(src.shape))
        return real_search(model, src, *args, **kwargs)

    monkeypatch.setattr(translator_module, "search_nbest", recording_search)
    translator = Translator.load(trained_checkpoint, SearchConfig(beam=1, max_len_a=0,
                                                                  max_len_b=3),
                                 device="cpu", batch_size=64, max_tokens=3000)
    lines = ["nine " * n for n in (2, 3, 900, 1000, 1100, 4000)] + ["one two"] * 20
    out = translator.translate_batch(lines)
    assert len(out) == len(lines)
    assert all(rows * width <= 3000 or rows == 1 for rows, width in shapes), shapes
    assert sum(rows for rows, _ in shapes) == len(lines)
    assert shapes[-1][0] == 1 and shapes[-1][1] > 3000  # too long for the budget: alone
    assert shapes[0][0] == 22  # the short ones still share one batch


# ---------------------------------------------------------------------------------------
# Checkpoints and models, through every command that reads one
# ---------------------------------------------------------------------------------------


def _damaged(trained_checkpoint, tmp_path, damage: str):
    path = tmp_path / "model.pt"
    data = trained_checkpoint.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "flipped-bytes":
        middle = len(data) // 2
        path.write_bytes(data[:middle] + bytes(b ^ 0xFF for b in data[middle:middle + 64])
                         + data[middle + 64:])
    elif damage == "newer-version":
        import torch

        payload = load_checkpoint(trained_checkpoint)
        torch.save({**payload, "version": 99}, path)
    return path


@pytest.mark.parametrize("command", ["score", "average"])
@pytest.mark.parametrize("damage", ["truncated", "flipped-bytes", "newer-version"])
def test_score_and_average_refuse_damaged_checkpoints(trained_checkpoint, tmp_path, command,
                                                       damage):
    from typer.testing import CliRunner

    from rnmt_cli.main import app

    path = _damaged(trained_checkpoint, tmp_path, damage)
    (tmp_path / "s").write_text("nine\n")
    (tmp_path / "r").write_text("neun\n")
    if command == "score":  # in-process: the same `guarded` entry point, without torch's import
        args = ["score", "-m", str(path), "--src", str(tmp_path / "s"), "--ref",
                str(tmp_path / "r"), "--device", "cpu"]
    else:
        args = ["average", str(trained_checkpoint), str(path), "-o", str(tmp_path / "avg.pt")]
    result = CliRunner().invoke(app, args)
    assert not (tmp_path / "avg.pt").exists()
    assert result.exit_code == 2 and result.stdout == "", result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rnmt: error:") and "model.pt" in lines[0]


def _tiny_model(trained_checkpoint, path, arch):
    """An untrained model of `arch` whose source and target vocabularies are both the
    translation model's target vocabulary (a language model needs one vocabulary)."""
    from rnmt.checkpoint import save_checkpoint
    from rnmt.models import ModelConfig, build_model

    payload = load_checkpoint(trained_checkpoint)
    size = len(payload["tgt_vocab"]["pieces"])
    config = ModelConfig(size, size, arch=arch, emb_dim=8, hidden_dim=8, dec_hidden_dim=8,
                         dropout=0.0)
    save_checkpoint({"model_config": config.to_dict(), "model": build_model(config).state_dict(),
                     "src_vocab": payload["tgt_vocab"], "tgt_vocab": payload["tgt_vocab"]},
                    path)
    return path


def _language_model(trained_checkpoint, path):
    """An untrained language model over the translation model's target vocabulary."""
    return _tiny_model(trained_checkpoint, path, "lm")


def _ensemble_error(models) -> str:
    from typer.testing import CliRunner

    from rnmt_cli.main import app

    args = [a for m in models for a in ("-m", str(m))]
    result = CliRunner().invoke(app, ["translate", *args, "--device", "cpu"], input="nine\n")
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and result.stdout == "", result.output
    assert len(lines) == 1 and lines[0].startswith("rnmt: error:"), lines
    return lines[0]


def test_a_language_model_in_a_translation_ensemble_is_a_clear_error(trained_checkpoint,
                                                                      tmp_path):
    lm = _language_model(trained_checkpoint, tmp_path / "lm.pt")
    # Same vocabularies on both sides, so only the kind of model differs.
    translation = _tiny_model(trained_checkpoint, tmp_path / "tm.pt", "attention")
    for first, second in ((translation, lm), (lm, translation)):
        error = _ensemble_error([first, second])
        assert error == (f"rnmt: error: {second}: cannot ensemble a language model with a "
                         "translation model"), error
    # With the trained model, whose source vocabulary is not the LM's, the vocabularies
    # differ first: the error names the member and the side.
    error = _ensemble_error([trained_checkpoint, lm])
    assert str(lm) in error and "src vocabulary differs" in error, error


def test_a_language_model_given_a_source_to_score_is_a_clear_error(trained_checkpoint,
                                                                    tmp_path):
    _language_model(trained_checkpoint, tmp_path / "lm.pt")
    (tmp_path / "s").write_text("nine\n")
    (tmp_path / "r").write_text("neun\n")
    result = run_rnmt("score", "-m", str(tmp_path / "lm.pt"), "--src", str(tmp_path / "s"),
                      "--ref", str(tmp_path / "r"), "--device", "cpu")
    assert_one_line_error(result, "lm.pt", "language model", "--src")
    assert result.stdout == b""  # no p(y) numbers passed off as p(y | x)


# ---------------------------------------------------------------------------------------
# Faults during training
# ---------------------------------------------------------------------------------------


def _wait_for(condition, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def _spawn_training(bin_dir, save_dir, log, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen(
        RNMT + ["train", str(bin_dir), "--save-dir", str(save_dir), "--device", "cpu",
                "--max-tokens", "400", "--log-every", "1", "--save-every", "2",
                "--no-plot", *TINY_MODEL_FLAGS, *extra],
        stdout=subprocess.DEVNULL, stderr=log, env=env, cwd=ROOT,
    )


@pytest.mark.slow
def test_kill_9_at_random_moments_never_loses_the_newest_checkpoint(bin_dir, tmp_path):
    import random

    rng = random.Random(11)
    run = tmp_path / "run"
    steps_seen = []
    for kill in range(4):
        log_path = tmp_path / f"log{kill}"
        with open(log_path, "wb") as log:
            proc = _spawn_training(bin_dir, run, log, "--max-steps", "100000",
                                   *(["--resume"] if kill else []))
            # Wait until this process trains (and, the first time, has saved once).
            _wait_for(lambda: (run / "last.pt").exists() and b"step" in log_path.read_bytes())
            time.sleep(rng.uniform(0.1, 2.0))
            proc.kill()  # SIGKILL: no handler runs, a save may be half written
            proc.wait()
        assert b"Traceback" not in log_path.read_bytes()
        for checkpoint in run.glob("*.pt"):  # every complete file loads; torn ones are hidden
            load_checkpoint(checkpoint)
        step = load_checkpoint(run / "last.pt")["training"]["state"]["step"]
        steps_seen.append(step)
    assert steps_seen == sorted(steps_seen) and steps_seen[-1] >= 2, steps_seen
    final = steps_seen[-1] + 3
    with open(tmp_path / "final-log", "wb") as log:
        proc = _spawn_training(bin_dir, run, log, "--resume", "--max-steps", str(final))
        assert proc.wait(timeout=180) == 0, (tmp_path / "final-log").read_text()
    assert load_checkpoint(run / "last.pt")["step"] == final
    assert not [p.name for p in run.iterdir() if ".tmp" in p.name]  # torn writes cleared


def test_a_save_clears_temporaries_of_writers_killed_mid_save(tmp_path):
    import torch

    from rnmt.checkpoint import save_checkpoint

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, check=True).stdout.decode().strip()
    torn = tmp_path / f".last.pt.tmp{dead}"  # what kill -9 during a save leaves behind
    torn.write_bytes(b"PK\x03\x04 half a zip")
    live = tmp_path / f".last.pt.tmp{os.getppid()}"  # a running writer's file stays
    live.write_bytes(b"in progress")
    other = tmp_path / f".best.pt.tmp{dead}"  # only `last.pt`'s temporaries are looked at
    other.write_bytes(b"x")
    payload = {"model_config": {}, "model": {"w": torch.ones(1)}, "src_vocab": {},
               "tgt_vocab": {}}
    save_checkpoint(payload, tmp_path / "last.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["last.pt", live.name, other.name])


WRITER_FAILS_AFTER = """
import errno, sys, torch
from rnmt_cli.main import main

real_save, calls = torch.save, [0]


def save(*args, **kwargs):  # the disk fills up after {n} checkpoint writes
    calls[0] += 1
    if calls[0] > {n}:
        raise OSError(errno.ENOSPC, "No space left on device")
    return real_save(*args, **kwargs)


torch.save = save
sys.argv = ["rnmt", *sys.argv[1:]]
main()
"""


def test_disk_full_while_saving_keeps_the_previous_checkpoint_and_stops_clearly(bin_dir,
                                                                               tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-c", WRITER_FAILS_AFTER.format(n=2), "train", str(bin_dir),
         "--save-dir", str(tmp_path), "--device", "cpu", "--max-tokens", "400",
         "--save-every", "3", "--max-steps", "30", "--no-plot", *TINY_MODEL_FLAGS],
        capture_output=True, env=env, cwd=ROOT, timeout=180)
    err = result.stderr.decode()
    assert result.returncode == 2, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("rnmt: error:")]
    assert len(errors) == 1 and "No space left on device" in errors[0], err
    assert "last.pt" in errors[0] or "checkpoint" in errors[0], err
    survivor = load_checkpoint(tmp_path / "last.pt")  # the previous save, intact
    assert survivor["training"]["state"]["step"] in (3, 6)
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]  # no torn leftovers


class _Recorder(SilentReporter):
    """A reporter that keeps the warnings."""

    def __init__(self) -> None:
        self.warnings: list[str] = []

    def warning(self, message: str) -> None:
        self.warnings.append(message)


def _failing_batch_loss(monkeypatch, fail) -> None:
    """`batch_loss` raises `fail(n)` on its n-th call where that is not None."""
    import rnmt.training as training

    real_loss, calls = training.batch_loss, {"n": 0}

    def loss(*args, **kwargs):
        calls["n"] += 1
        error = fail(calls["n"])
        if error is not None:
            raise error
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(training, "batch_loss", loss)


OUT_OF_MEMORY = {
    "cuda": lambda: __import__("torch").OutOfMemoryError("CUDA out of memory (simulated)"),
    "cpu": lambda: RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. "
                                "DefaultCPUAllocator: can't allocate memory: you tried to "
                                "allocate 4000000000 bytes. Error code 12"),
    "python": MemoryError,
}


@pytest.mark.parametrize("kind", list(OUT_OF_MEMORY))
def test_out_of_memory_on_a_batch_skips_it_with_a_warning(bin_dir, tmp_path, monkeypatch,
                                                          kind):
    """As fairseq does: a batch too large for the machine is skipped, training goes on
    (on the CPU, torch reports a failed allocation as a RuntimeError: that stopped the run
    and lost the work since the last save before)."""
    from rnmt.training import TrainConfig, Trainer

    _failing_batch_loss(monkeypatch, lambda n: OUT_OF_MEMORY[kind]() if n == 3 else None)
    config = TrainConfig(save_dir=tmp_path, max_tokens=800, max_steps=5, device="cpu")
    reporter = _Recorder()
    trainer = Trainer(bin_dir, TINY_MODEL, config, reporter)
    summary = trainer.train()
    assert summary["step"] == 5 and trainer.state.oom_batches == 1
    assert len(reporter.warnings) == 1 and "out of memory" in reporter.warnings[0]


def test_out_of_memory_on_batch_after_batch_stops_with_the_work_saved(bin_dir, tmp_path,
                                                                     monkeypatch):
    """Not a batch too large but a machine too small: max_bad_updates skipped batches in
    a row end the run, with the updates before them in last.pt."""
    from rnmt.errors import ConfigError
    from rnmt.training import TrainConfig, Trainer

    _failing_batch_loss(monkeypatch, lambda n: OUT_OF_MEMORY["cpu"]() if n > 2 else None)
    config = TrainConfig(save_dir=tmp_path, max_tokens=800, max_steps=10, device="cpu",
                         max_bad_updates=3)
    reporter = _Recorder()
    with pytest.raises(ConfigError, match="out of memory on 3 batches in a row.*--max-tokens"):
        Trainer(bin_dir, TINY_MODEL, config, reporter).train()
    assert len(reporter.warnings) == 2  # the first two skips; the third is the error
    saved = load_checkpoint(tmp_path / "last.pt")["training"]["state"]
    assert saved["step"] == 2
    assert saved["elapsed"] > 0  # the run's time so far, for --max-time on --resume


def test_an_error_between_updates_saves_the_work_before_it_ends_the_run(bin_dir, tmp_path,
                                                                        monkeypatch):
    """An unexpected error (a bug, say) in the 5th batch: the error still ends the run, but
    the 4 updates before it are in last.pt (nothing was saved before), and --resume goes
    on from there."""
    from rnmt.training import TrainConfig, Trainer

    _failing_batch_loss(monkeypatch, lambda n: ValueError("a bug") if n == 5 else None)
    config = TrainConfig(save_dir=tmp_path, max_tokens=800, max_steps=8, device="cpu")
    reporter = _Recorder()
    with pytest.raises(ValueError, match="a bug"):
        Trainer(bin_dir, TINY_MODEL, config, reporter).train()
    assert reporter.warnings == [f"an error stopped training at step 4; saved "
                                 f"{tmp_path / 'last.pt'} (continue with --resume)"]
    assert load_checkpoint(tmp_path / "last.pt")["training"]["state"]["step"] == 4
    monkeypatch.undo()
    config = TrainConfig(save_dir=tmp_path, max_tokens=800, max_steps=8, device="cpu",
                         resume=True)
    assert Trainer(bin_dir, TINY_MODEL, config, _Recorder()).train()["step"] == 8


def test_when_the_save_after_an_error_fails_too_the_first_error_is_the_one_raised(
        bin_dir, tmp_path, monkeypatch):
    import rnmt.training as training
    from rnmt.errors import CheckpointError
    from rnmt.training import TrainConfig, Trainer

    def full_disk(payload, path):
        raise CheckpointError(f"{path}: cannot save checkpoint (No space left on device)")

    _failing_batch_loss(monkeypatch, lambda n: ValueError("a bug") if n == 3 else None)
    monkeypatch.setattr(training, "save_checkpoint", full_disk)
    config = TrainConfig(save_dir=tmp_path, max_tokens=800, max_steps=8, device="cpu")
    reporter = _Recorder()
    with pytest.raises(ValueError, match="a bug"):
        Trainer(bin_dir, TINY_MODEL, config, reporter).train()
    assert len(reporter.warnings) == 1
    assert "step 2, and saving failed too" in reporter.warnings[0]
    assert "No space left on device" in reporter.warnings[0]


def test_an_error_inside_an_optimizer_step_saves_nothing(bin_dir, tmp_path):
    """Half-updated parameters and optimizer state are no state to resume from: the last
    save (here: none) stays what --resume finds."""
    from rnmt.training import TrainConfig, Trainer

    config = TrainConfig(save_dir=tmp_path, max_tokens=800, max_steps=8, device="cpu")
    reporter = _Recorder()
    trainer = Trainer(bin_dir, TINY_MODEL, config, reporter)
    real_step, calls = trainer.optimizer.step, {"n": 0}

    def step_that_fails_midway(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            next(trainer.model.parameters()).data.add_(1.0)  # torn: one tensor updated
            raise RuntimeError("failed in the middle of an update")
        return real_step(*args, **kwargs)

    trainer.optimizer.step = step_that_fails_midway
    with pytest.raises(RuntimeError, match="in the middle"):
        trainer.train()
    assert not (tmp_path / "last.pt").exists() and reporter.warnings == []
