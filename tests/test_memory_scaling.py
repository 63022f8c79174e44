"""A corpus larger than memory: preprocessing streams it, training maps it, and neither
holds more memory for a larger corpus than for a small one (beyond a few bytes per line)."""

from __future__ import annotations

import gzip
import sys

import numpy as np
import pytest

import rnmt.preprocess
from rnmt.preprocess import PreprocessConfig, preprocess
from rnmt.text import TextLines, read_lines

from conftest import load_benchmark

TRICKY = (b"\xef\xbb\xbfone\r\n\r\ntwo\r\r\nthr\xe9e\n\n\xef\xbb\xbfbom inside\nno final newline")


@pytest.mark.parametrize("packed", [False, True])
def test_streamed_lines_are_the_lines_read_whole(tmp_path, packed):
    path = tmp_path / ("t.de.gz" if packed else "t.de")
    path.write_bytes(gzip.compress(TRICKY) if packed else TRICKY)
    whole = read_lines(path)
    streamed = TextLines(path, "replace")
    assert list(streamed) == whole.lines
    assert (streamed.lines, streamed.invalid_lines) == (len(whole.lines), whole.invalid_lines)


def test_binarising_chunk_by_chunk_writes_what_one_chunk_writes(corpus_dir, bin_dir, tmp_path,
                                                                 monkeypatch):
    def run(out):
        return preprocess(PreprocessConfig(
            src_lang="en", tgt_lang="de", out=out, train=str(corpus_dir / "train"),
            valid=str(corpus_dir / "valid"), spm_model=bin_dir / "spm.model", max_len=12))

    whole = run(tmp_path / "whole")
    monkeypatch.setattr(rnmt.preprocess, "CHUNK_LINES", 7)
    chunked = run(tmp_path / "chunked")
    assert chunked == whole
    assert whole.splits[0].too_long > 0  # filtering happened inside the chunks
    for name in ("train.en", "train.de", "valid.en", "valid.de"):
        for part in ("ids", "offsets"):
            a = np.load(tmp_path / "whole" / f"{name}.{part}.npy")
            b = np.load(tmp_path / "chunked" / f"{name}.{part}.npy")
            assert a.dtype == b.dtype and np.array_equal(a, b)
    assert not list((tmp_path / "chunked").glob("*.tmp"))


def test_a_commands_peak_memory_is_its_own_not_the_parents():
    """Linux carries the spawning parent's peak RSS into a child's ru_maxrss; the
    benchmarks' run_child must report the command's alone, whatever this process holds."""
    bench = load_benchmark("memory_scaling")
    held = bytearray(400 * 1024 * 1024)
    held[::4096] = b"\1" * len(held[::4096])  # touch every page: 400 MB resident here
    small = bench.run_child([sys.executable, "-c", "pass"], threads=1)
    grows = bench.run_child([sys.executable, "-c", "b = bytearray(200 << 20); "
                             "b[::4096] = b'1' * len(b[::4096])"], threads=1)
    del held
    assert small.exit_code == 0 and small.peak_rss_mb < 100, small
    assert 200 < grows.peak_rss_mb < 300, grows


@pytest.mark.slow
def test_memory_stays_flat_from_30k_to_240k_lines(tmp_path):
    """8x the lines, 10 updates of a tiny model each: training's peak RSS (the kernel's
    ru_maxrss) grows by at most 40 MB (its per-line arrays are ~30 bytes a pair, i.e. ~6 MB
    here), preprocessing's by at most 100 MB (reading the text whole would add ~230 MB).
    Each peak is the command's own: this process's peak (it generates the corpora) does
    not count (benchmarks/common.py, LAUNCHER)."""
    bench = load_benchmark("memory_scaling")
    spm_model = bench.learn_spm(tmp_path, threads=1)
    small, large = (bench.measure(tmp_path, n, spm_model, steps=10, threads=1)
                    for n in (30_000, 240_000))
    assert large["pieces"] > 7 * small["pieces"]
    assert large["train_peak_rss_mb"] <= small["train_peak_rss_mb"] + 40, (small, large)
    assert large["preprocess_peak_rss_mb"] <= small["preprocess_peak_rss_mb"] + 100, (small, large)
