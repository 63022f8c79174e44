"""Property tests: whatever text or bytes users feed in, rnmt keeps one output line per input
line, fails only with a one-line error (exit 2), and never shows a traceback.

Two layers: many examples in-process through the exact code the CLI runs (LineReader ->
Translator for `translate`, rnmt.preprocess for `preprocess`), and a few examples through
the CLI itself (a subprocess costs seconds: the torch import).
"""

from __future__ import annotations

import io
import json
import random
import subprocess

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from conftest import run_rnmt
from rnmt.errors import DataError
from rnmt.preprocess import PreprocessConfig, preprocess
from rnmt.search import SearchConfig
from rnmt.text import LineReader
from rnmt.translator import Translator

# Text users paste: any code point but surrogates (which UTF-8 cannot encode), with the
# awkward ones made likely: controls, line/paragraph separators, BOMs, combining marks.
AWKWARD = st.sampled_from(["\x00", "\x01", "\x1b", "\x7f", "\t", "\r", "\x0b", "\x0c",
                           "\x85", "\u2028", "\u2029", "\ufeff", "\u200b", "\u0301",
                           "\ufffd", "😀", " ", "nine", "hundred", "ein"])
LINE = st.lists(st.one_of(st.text(max_size=12).filter(lambda s: "\n" not in s), AWKWARD),
                max_size=8).map("".join)
ENDING = st.sampled_from([b"\n", b"\r\n"])


@st.composite
def documents(draw, n_lines: int | None = None) -> bytes:
    """Lines of random text with mixed endings, maybe a BOM, maybe no final newline,
    maybe some random (often invalid UTF-8) bytes spliced into a line."""
    lines = draw(st.lists(LINE, min_size=n_lines or 1, max_size=n_lines or 10))
    parts = [line.encode("utf-8") + draw(ENDING) for line in lines]
    if draw(st.booleans()):
        i = draw(st.integers(0, len(parts) - 1))
        parts[i] = draw(st.binary(max_size=16)).replace(b"\n", b"") + parts[i]
    data = b"".join(parts)
    if draw(st.booleans()):
        data = data.rstrip(b"\n").rstrip(b"\r")
    if draw(st.booleans()):
        data = b"\xef\xbb\xbf" + data
    return data


def expected_lines(data: bytes) -> int:
    """What `wc -l` would say, plus one for a last line without its newline; a leading
    UTF-8 byte order mark is no text."""
    data = data.removeprefix(b"\xef\xbb\xbf")
    return data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)


@pytest.fixture(scope="module")
def translator(trained_checkpoint) -> Translator:
    return Translator.load(trained_checkpoint, SearchConfig(beam=2, max_len_a=0.5, max_len_b=5),
                           device="cpu", batch_size=8)


FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


@FUZZ
@given(data=st.one_of(documents(), st.binary(max_size=300)))
def test_translate_gives_one_line_per_input_line_for_any_bytes(translator, data):
    reader = LineReader(io.BytesIO(data), "<stdin>", "replace")
    out = list(translator.translate_lines(reader))
    assert len(out) == expected_lines(data)
    assert all("\n" not in line for line in out)
    sources = data.removeprefix(b"\xef\xbb\xbf").split(b"\n")
    for source, line in zip(sources, out):
        if not source.strip():  # blank in, blank out
            assert line == ""


@FUZZ
@given(data=st.one_of(documents(), st.binary(max_size=300)))
def test_strict_utf8_reads_every_line_or_names_the_first_bad_one(data):
    body = data.removeprefix(b"\xef\xbb\xbf")
    chunks = body.split(b"\n")
    first_bad = None
    for number, chunk in enumerate(chunks, start=1):
        try:
            chunk.decode("utf-8")
        except UnicodeDecodeError:
            first_bad = number
            break
    reader = LineReader(io.BytesIO(data), "in.txt", "strict")
    if first_bad is None:
        assert len(list(reader)) == expected_lines(data)
    else:
        with pytest.raises(DataError, match=rf"^in\.txt: line {first_bad}: invalid UTF-8"):
            list(reader)


# Mostly parallel files of one line count; sometimes not (that must be a clear error).
PARALLEL = st.one_of(
    st.integers(1, 10).flatmap(lambda n: st.tuples(documents(n), documents(n))),
    st.tuples(documents(), documents()),
)


@FUZZ
@given(pair=PARALLEL)
def test_preprocess_counts_every_line_or_refuses_in_one_error(bin_dir, tmp_path_factory, pair):
    src, tgt = pair
    # The demo corpus's sentencepiece model: no model is trained per example, so it is fast.
    directory = tmp_path_factory.mktemp("fuzz")
    (directory / "c.en").write_bytes(src)
    (directory / "c.de").write_bytes(tgt)
    config = PreprocessConfig(src_lang="en", tgt_lang="de", out=directory / "bin",
                              train=str(directory / "c"), valid=str(directory / "c"),
                              spm_model=bin_dir / "spm.model", max_len=20, threads=1)
    try:
        report = preprocess(config)
    except DataError as err:
        message = str(err)
        event("refused")
        assert "\n" not in message
        assert ("differ in length" in message or "empty" in message
                or "no training pair is left" in message), message
        return
    event("preprocessed")
    meta = json.loads((directory / "bin" / "meta.json").read_text())
    lines = expected_lines(src)
    for split in report.splits:
        assert split.total == lines
        assert split.kept + split.empty + split.too_long == split.total
        assert meta["splits"][split.name]["kept"] == split.kept
        offsets = np.load(directory / "bin" / f"{split.name}.en.offsets.npy")
        assert len(offsets) - 1 == split.kept
    valid = next(s for s in report.splits if s.name == "valid")
    assert valid.kept == valid.total  # valid and test are never filtered


def _random_document(rng: random.Random, n_lines: int) -> bytes:
    """Seeded stand-in for hypothesis when one subprocess must cover many cases at once."""
    pool = [chr(c) for c in (*range(0, 0x80), 0x85, 0xA0, 0x301, 0x2028, 0xFEFF, 0x1F600)]
    pool += ["nine ", "hundred ", "ein", "\u4e2d\u6587", "\u0645\u0631\u062d\u0628\u0627"]
    lines = []
    for _ in range(n_lines):
        kind = rng.random()
        if kind < 0.1:
            lines.append(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40))))
        elif kind < 0.15:
            lines.append(("seven " * rng.randrange(500, 2000)).encode())
        else:
            text = "".join(rng.choice(pool) for _ in range(rng.randrange(0, 40)))
            lines.append(text.replace("\n", " ").encode("utf-8"))
    body = b"".join(line.replace(b"\n", b"") + rng.choice([b"\n", b"\r\n"]) for line in lines)
    return b"\xef\xbb\xbf" + body[:-1]  # a BOM, and no final newline


def _assert_clean_exit(result: subprocess.CompletedProcess) -> None:
    err = result.stderr.decode()
    assert result.returncode in (0, 2), err
    assert "Traceback" not in err
    if result.returncode == 2:
        assert [line for line in err.splitlines() if line.startswith("rnmt: error:")], err


def test_translate_cli_survives_a_random_document(trained_checkpoint):
    data = _random_document(random.Random(7), 300)
    result = run_rnmt("translate", "-m", str(trained_checkpoint), "--beam", "2", "--device",
                      "cpu", "--max-len-a", "0.2", "--max-len-b", "5", stdin=data)
    _assert_clean_exit(result)
    assert result.returncode == 0
    assert result.stdout.count(b"\n") == expected_lines(data)
    assert b"invalid UTF-8" in result.stderr  # counted, not silently replaced


@pytest.mark.slow
@settings(max_examples=5, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.lists(st.one_of(documents(), st.binary(max_size=200)), min_size=1,
                     max_size=20).map(b"".join))
def test_translate_and_preprocess_cli_on_random_input(trained_checkpoint, bin_dir,
                                                      tmp_path_factory, data):
    result = run_rnmt("translate", "-m", str(trained_checkpoint), "--beam", "2", "--device",
                      "cpu", "--max-len-a", "0.2", "--max-len-b", "5", stdin=data)
    _assert_clean_exit(result)
    assert result.returncode == 0
    assert result.stdout.count(b"\n") == expected_lines(data)

    directory = tmp_path_factory.mktemp("cli-fuzz")
    (directory / "c.en").write_bytes(data)
    (directory / "c.de").write_bytes(data[::-1])  # often of another line count: exit 2
    for errors in ("replace", "strict"):
        result = run_rnmt("preprocess", "-s", "en", "-t", "de", "--train",
                          str(directory / "c"), "--out", str(directory / errors),
                          "--spm-model", str(bin_dir / "spm.model"), "--errors", errors)
        _assert_clean_exit(result)
