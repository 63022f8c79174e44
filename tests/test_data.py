"""Reading text and batching."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch

from rnmt.data import (ParallelData, TokenArray, TokenArrayWriter, TokenBatchSampler, collate,
                       pad_sentences)
from rnmt.errors import DataError
from rnmt.preprocess import PreprocessConfig, preprocess
from rnmt.text import read_lines
from rnmt.vocab import BOS, EOS, PAD


def test_reading_handles_crlf_bom_gzip_and_a_missing_final_newline(tmp_path):
    plain = tmp_path / "a.txt"
    plain.write_bytes(b"\xef\xbb\xbfone\r\ntwo\n\nfour")
    assert read_lines(plain).lines == ["one", "two", "", "four"]
    packed = tmp_path / "a.txt.gz"
    packed.write_bytes(gzip.compress("eins\nzwei\n".encode()))
    assert read_lines(packed).lines == ["eins", "zwei"]


def test_invalid_utf8_is_replaced_and_counted_or_stops_with_the_line_number(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"fine\nbro\xffken\nfine\n")
    text = read_lines(path, errors="replace")
    assert text.lines[1] == "bro\ufffdken" and text.invalid_lines == 1
    with pytest.raises(DataError, match=r"bad.txt: line 2"):
        read_lines(path, errors="strict")


def test_parallel_files_of_unequal_length_name_both_files_and_counts(tmp_path):
    (tmp_path / "x.de").write_text("a\nb\nc\n")
    (tmp_path / "x.en").write_text("a\nb\n")
    config = PreprocessConfig(src_lang="de", tgt_lang="en", out=tmp_path / "bin",
                              train=str(tmp_path / "x"))
    with pytest.raises(DataError) as err:
        preprocess(config)  # checked before anything is learnt or written
    assert not (tmp_path / "bin").exists()
    assert "x.de has 3 lines" in str(err.value) and "x.en has 2" in str(err.value)


def test_a_truncated_gzip_file_is_a_data_error(tmp_path):
    path = tmp_path / "t.de.gz"
    path.write_bytes(gzip.compress(b"line\n" * 1000)[:40])
    with pytest.raises(DataError, match="t.de.gz"):
        read_lines(path)


def _random_data(n: int, seed: int = 0) -> ParallelData:
    rng = np.random.default_rng(seed)
    src = [rng.integers(4, 50, rng.integers(1, 40)) for _ in range(n)]
    tgt = [rng.integers(4, 50, rng.integers(1, 40)) for _ in range(n)]
    return ParallelData(TokenArray.from_sentences(src), TokenArray.from_sentences(tgt))


def test_every_training_pair_is_batched_exactly_once_per_epoch():
    data = _random_data(500)
    sampler = TokenBatchSampler(data.src.lengths, data.tgt.lengths, max_tokens=300, seed=7)
    for epoch in range(3):
        seen = np.concatenate(list(sampler))
        assert sorted(seen.tolist()) == list(range(500))
        assert sampler.epoch == epoch + 1


def test_batches_stay_within_the_token_budget_and_epochs_differ():
    data = _random_data(500)
    sampler = TokenBatchSampler(data.src.lengths, data.tgt.lengths, max_tokens=300, seed=7)
    for indices in sampler.batches(0):
        batch = collate(data, indices)
        assert batch.src.numel() <= 300 and batch.tgt_out.numel() <= 300
    first = [b.tolist() for b in sampler.batches(0)]
    assert first == [b.tolist() for b in sampler.batches(0)]  # reproducible
    assert first != [b.tolist() for b in sampler.batches(1)]  # reshuffled


def test_an_epochs_batches_are_built_once_and_rebuilt_the_same():
    data = _random_data(300)
    sampler = TokenBatchSampler(data.src.lengths, data.tgt.lengths, 200, seed=3)
    first = sampler.batches(0)
    assert sampler.batches(0) is first  # asked again (start-up asks thrice): not re-sorted
    other = TokenBatchSampler(data.src.lengths, data.tgt.lengths, 200, seed=3).batches(1)
    assert [b.tolist() for b in sampler.batches(1)] == [b.tolist() for b in other]
    again = sampler.batches(0)  # after another epoch: built afresh, the same batches
    assert again is not first and [b.tolist() for b in again] == [b.tolist() for b in first]


def test_sampler_resumes_mid_epoch_where_it_stopped():
    data = _random_data(300)
    straight = TokenBatchSampler(data.src.lengths, data.tgt.lengths, 200, seed=3)
    expected = [b.tolist() for b in straight.batches(0)]
    sampler = TokenBatchSampler(data.src.lengths, data.tgt.lengths, 200, seed=3)
    it = iter(sampler)
    head = [next(it).tolist() for _ in range(5)]
    resumed = TokenBatchSampler(data.src.lengths, data.tgt.lengths, 200, seed=3)
    assert resumed.load_state_dict(sampler.state_dict())
    assert head + [b.tolist() for b in resumed] == expected


def test_a_position_saved_under_other_data_or_budgets_restarts_its_epoch():
    data = _random_data(300)
    sampler = TokenBatchSampler(data.src.lengths, data.tgt.lengths, 200, seed=3)
    sampler.epoch, sampler.position = 2, 5
    state = sampler.state_dict()
    others = [TokenBatchSampler(data.src.lengths, data.tgt.lengths, 300, seed=3),  # budget
              TokenBatchSampler(data.src.lengths, data.tgt.lengths, 200, seed=4),  # seed
              TokenBatchSampler(data.src.lengths[:-1], data.tgt.lengths[:-1], 200, seed=3)]
    lengths = data.tgt.lengths.copy()
    lengths[0] += 1  # one sentence one piece longer: as many pairs, other batches
    others.append(TokenBatchSampler(data.src.lengths, lengths, 200, seed=3))
    for other in others:
        assert not other.load_state_dict(state)
        assert (other.epoch, other.position) == (2, 0)
    old = TokenBatchSampler(data.src.lengths, data.tgt.lengths, 300, seed=3)
    assert old.load_state_dict({"epoch": 2, "position": 5})  # saved before it was kept
    assert (old.epoch, old.position) == (2, 5)


def test_collate_adds_bos_and_eos_and_pads():
    data = ParallelData(TokenArray.from_sentences([np.array([5, 6]), np.array([7])]),
                        TokenArray.from_sentences([np.array([8]), np.array([9, 10, 11])]))
    batch = collate(data, [0, 1])
    assert batch.src.tolist() == [[5, 6, EOS], [7, EOS, PAD]]
    assert batch.src_lengths.tolist() == [3, 2]
    assert batch.tgt_in.tolist() == [[BOS, 8, PAD, PAD], [BOS, 9, 10, 11]]
    assert batch.tgt_out.tolist() == [[8, EOS, PAD, PAD], [9, 10, 11, EOS]]
    assert batch.num_tgt_tokens == 6
    # the real target positions, indexed on the host in row order
    assert batch.real.tolist() == [0, 1, 4, 5, 6, 7]
    assert batch.real_targets().tolist() == [8, EOS, 9, 10, 11, EOS]


@pytest.mark.parametrize("prefix,suffix", [(None, None), (BOS, None), (None, EOS), (BOS, EOS)])
def test_pad_sentences_places_every_id_with_its_prefix_and_suffix(prefix, suffix):
    """Arrays of any integer dtype or lists, an empty sentence among them: each row is
    [prefix] ids [suffix], then PAD; lengths count the prefix and suffix."""
    sentences = [np.array([5, 6, 7], dtype=np.int32), [], np.array([8], dtype=np.uint16), [9, 10]]
    ids, lengths = pad_sentences(sentences, prefix=prefix, suffix=suffix)
    rows = [([prefix] if prefix is not None else []) + [int(i) for i in s]
            + ([suffix] if suffix is not None else []) for s in sentences]
    width = max(len(r) for r in rows)
    assert ids.dtype == lengths.dtype == torch.long
    assert ids.tolist() == [r + [PAD] * (width - len(r)) for r in rows]
    assert lengths.tolist() == [len(r) for r in rows]
    empty, no_lengths = pad_sentences([], suffix=EOS)
    assert empty.shape == (0, 0) and no_lengths.tolist() == []


def test_written_token_arrays_load_with_numpy_and_with_the_loader(tmp_path):
    sentences = [np.array([5, 6, 7]), np.array([], dtype=np.int64), np.array([8])]
    with TokenArrayWriter(tmp_path / "x") as writer:
        writer.append(sentences[:2])
        writer.append([])
        writer.append(sentences[2:])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.ids.npy", "x.offsets.npy"]
    ids, offsets = np.load(tmp_path / "x.ids.npy"), np.load(tmp_path / "x.offsets.npy")
    assert ids.dtype == np.int32 and ids.tolist() == [5, 6, 7, 8]
    assert offsets.dtype == np.int64 and offsets.tolist() == [0, 3, 3, 4]
    loaded = TokenArray.load(tmp_path / "x")
    assert [loaded[i].tolist() for i in range(len(loaded))] == [[5, 6, 7], [], [8]]


def test_a_failed_write_leaves_no_token_array(tmp_path):
    with pytest.raises(RuntimeError), TokenArrayWriter(tmp_path / "x") as writer:
        writer.append([np.array([5, 6])])
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_a_failure_while_closing_leaves_neither_file(tmp_path, monkeypatch):
    """The ids must not get their final name while the offsets fail (e.g. a full disk)."""
    import rnmt.data

    real_header = rnmt.data.npy_header

    def header(dtype, count):
        if dtype is np.int64 and count > 0:  # the offsets' final header
            raise OSError(28, "No space left on device")
        return real_header(dtype, count)

    monkeypatch.setattr(rnmt.data, "npy_header", header)
    with pytest.raises(OSError), TokenArrayWriter(tmp_path / "x") as writer:
        writer.append([np.array([5, 6])])
    assert list(tmp_path.iterdir()) == []
