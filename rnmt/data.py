"""Text in, batches out: reading corpora, binarised splits, token-budget batching.

    text files ──read_lines──▶ lines ──Vocabulary.encode──▶ ids ──TokenArray──▶ disk (.npy)
    disk ──TokenArray.load (mmap)──▶ ParallelData ──TokenBatchSampler──▶ collate ──▶ Batch

A binarised side of a split is one flat int32 array of ids plus an int64 offsets array
(sentence i is `ids[offsets[i]:offsets[i+1]]`), memory-mapped so a corpus larger than RAM
can be trained on.
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from rnmt.errors import DataError
from rnmt.vocab import BOS, EOS, PAD


# ---------------------------------------------------------------------------------------
# Reading text
# ---------------------------------------------------------------------------------------


@dataclass
class TextFile:
    """The lines of a text file and how many of them held invalid UTF-8."""

    lines: list[str]
    invalid_lines: int


def read_lines(path: str | Path, errors: str = "replace") -> TextFile:
    """Read a plain or gzip text file as lines without their ending (`\\n` or `\\r\\n`).

    `errors="strict"` stops at the first invalid UTF-8 byte with a `DataError` that names
    the file and line; `"replace"` substitutes U+FFFD and counts the lines it touched.
    A UTF-8 byte order mark at the start is dropped.
    """
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, not a text file") from None
    except PermissionError:
        raise DataError(f"{path}: permission denied") from None
    except (EOFError, OSError, zlib.error) as err:
        raise DataError(f"{path}: cannot read ({err})") from None
    return decode_lines(raw, str(path), errors)


def decode_lines(raw: bytes, name: str, errors: str = "replace") -> TextFile:
    """Split bytes into lines and decode each as UTF-8 under the given error policy."""
    if errors not in ("strict", "replace"):
        raise ValueError(f"unknown UTF-8 error policy {errors!r}")
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    chunks = raw.split(b"\n")
    if chunks and chunks[-1] == b"":
        chunks.pop()  # the final newline ends the last line; it does not start a new one
    lines: list[str] = []
    invalid = 0
    for number, chunk in enumerate(chunks, start=1):
        if chunk.endswith(b"\r"):
            chunk = chunk[:-1]
        try:
            lines.append(chunk.decode("utf-8"))
        except UnicodeDecodeError as err:
            if errors == "strict":
                raise DataError(
                    f"{name}: line {number}: invalid UTF-8 at byte {err.start} "
                    "(use --errors replace to substitute U+FFFD)"
                ) from None
            invalid += 1
            lines.append(chunk.decode("utf-8", errors="replace"))
    return TextFile(lines, invalid)


def corpus_path(prefix: str | Path, lang: str) -> Path:
    """`corpus/train` + `de` -> `corpus/train.de`, or `corpus/train.de.gz` if only that exists."""
    plain = Path(f"{prefix}.{lang}")
    gz = Path(f"{prefix}.{lang}.gz")
    if not plain.exists() and gz.exists():
        return gz
    return plain


def read_parallel(
    src_path: Path, tgt_path: Path, errors: str = "replace"
) -> tuple[TextFile, TextFile]:
    """Both sides of a parallel split; unequal line counts are a `DataError`."""
    src, tgt = read_lines(src_path, errors), read_lines(tgt_path, errors)
    if len(src.lines) != len(tgt.lines):
        raise DataError(
            f"parallel files differ in length: {src_path} has {len(src.lines)} lines, "
            f"{tgt_path} has {len(tgt.lines)}"
        )
    return src, tgt


# ---------------------------------------------------------------------------------------
# Binarised token arrays
# ---------------------------------------------------------------------------------------


class TokenArray:
    """Sentences of ids as one flat array plus offsets; `arr[i]` is sentence i's ids."""

    def __init__(self, ids: np.ndarray, offsets: np.ndarray) -> None:
        self.ids = ids
        self.offsets = offsets

    @classmethod
    def from_sentences(cls, sentences: Sequence[np.ndarray]) -> "TokenArray":
        lengths = np.fromiter((len(s) for s in sentences), dtype=np.int64, count=len(sentences))
        offsets = np.zeros(len(sentences) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        ids = (
            np.concatenate(sentences).astype(np.int32)
            if len(sentences)
            else np.zeros(0, np.int32)
        )
        return cls(ids, offsets)

    def save(self, prefix: Path) -> None:
        np.save(f"{prefix}.ids.npy", self.ids)
        np.save(f"{prefix}.offsets.npy", self.offsets)

    @classmethod
    def load(cls, prefix: Path) -> "TokenArray":
        try:
            ids = np.load(f"{prefix}.ids.npy", mmap_mode="r")
            offsets = np.load(f"{prefix}.offsets.npy", mmap_mode="r")
        except FileNotFoundError as err:
            raise DataError(f"missing binarised data: {err.filename}") from None
        except ValueError as err:
            raise DataError(f"corrupt binarised data at {prefix}: {err}") from None
        return cls(ids, offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        return self.ids[self.offsets[i] : self.offsets[i + 1]]

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


@dataclass
class ParallelData:
    """One split: source and target sentences (the target is None for a language model)."""

    src: TokenArray
    tgt: TokenArray | None

    def __len__(self) -> int:
        return len(self.src)


# ---------------------------------------------------------------------------------------
# Batching
# ---------------------------------------------------------------------------------------


@dataclass
class Batch:
    """A padded batch. Shapes: src (batch, src_len); tgt_in/tgt_out (batch, tgt_len).

    `tgt_in` is `<s> y_1 … y_n` and `tgt_out` is `y_1 … y_n </s>` (teacher forcing).
    `indices` are the sentences' positions in their split.
    """

    src: Tensor
    src_lengths: Tensor
    tgt_in: Tensor | None
    tgt_out: Tensor | None
    indices: Tensor

    @property
    def num_tgt_tokens(self) -> int:
        assert self.tgt_out is not None
        return int((self.tgt_out != PAD).sum())

    def to(self, device: torch.device) -> "Batch":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Batch(
            move(self.src),
            self.src_lengths,  # lengths stay on the CPU, as pack_padded_sequence wants
            move(self.tgt_in),
            move(self.tgt_out),
            self.indices,
        )


def pad_sentences(sentences: Sequence[np.ndarray], prefix: int | None = None,
                  suffix: int | None = None) -> tuple[Tensor, Tensor]:
    """Sentences of ids -> (batch, max_len) long tensor padded with PAD, and their lengths."""
    extra = (prefix is not None) + (suffix is not None)
    lengths = torch.tensor([len(s) + extra for s in sentences], dtype=torch.long)
    out = torch.full((len(sentences), int(lengths.max()) if len(sentences) else 0), PAD,
                     dtype=torch.long)
    for row, sentence in enumerate(sentences):
        start = 0
        if prefix is not None:
            out[row, 0] = prefix
            start = 1
        out[row, start : start + len(sentence)] = torch.from_numpy(
            np.asarray(sentence, dtype=np.int64)
        )
        if suffix is not None:
            out[row, start + len(sentence)] = suffix
    return out, lengths


def collate(data: ParallelData, indices: Sequence[int]) -> Batch:
    """Gather sentences `indices` of a split into one padded batch (source gets `</s>`)."""
    src, src_lengths = pad_sentences([data.src[i] for i in indices], suffix=EOS)
    tgt_in = tgt_out = None
    if data.tgt is not None:
        targets = [data.tgt[i] for i in indices]
        tgt_in, _ = pad_sentences(targets, prefix=BOS)
        tgt_out, _ = pad_sentences(targets, suffix=EOS)
    return Batch(src, src_lengths, tgt_in, tgt_out, torch.tensor(list(indices), dtype=torch.long))


class TokenBatchSampler:
    """Batches of sentence indices under a token budget, from length-sorted buckets.

    Sentences are sorted by (target length, source length) with random tie-breaking, cut
    into batches whose padded size `n_sentences * max(len + 1)` stays within `max_tokens`
    on either side, and the batches are shuffled. Every epoch re-draws the order from
    `seed + epoch`, so an epoch can be reproduced (and resumed) from `(epoch, position)`.
    """

    def __init__(
        self,
        src_lengths: np.ndarray,
        tgt_lengths: np.ndarray | None,
        max_tokens: int,
        max_sentences: int | None = None,
        seed: int = 1,
        shuffle: bool = True,
    ) -> None:
        self.src_lengths = np.asarray(src_lengths, dtype=np.int64) + 1  # + </s>
        self.tgt_lengths = (
            self.src_lengths if tgt_lengths is None else np.asarray(tgt_lengths, np.int64) + 1
        )
        self.max_tokens = max_tokens
        self.max_sentences = max_sentences or len(self.src_lengths) or 1
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.position = 0  # batches of the current epoch already handed out

    def batches(self, epoch: int) -> list[np.ndarray]:
        """All batches of one epoch, in the order they are trained."""
        rng = np.random.default_rng(self.seed + epoch)
        n = len(self.src_lengths)
        tie = rng.permutation(n) if self.shuffle else np.arange(n)
        order = np.lexsort((tie, self.src_lengths, self.tgt_lengths))
        batches: list[np.ndarray] = []
        start = 0
        longest = 0
        for pos, i in enumerate(order):
            longest_if_added = max(longest, self.src_lengths[i], self.tgt_lengths[i])
            size = pos - start + 1
            if pos > start and (
                size * longest_if_added > self.max_tokens or size > self.max_sentences
            ):
                batches.append(order[start:pos])
                start = pos
                longest_if_added = max(self.src_lengths[i], self.tgt_lengths[i])
            longest = longest_if_added
        if start < n:
            batches.append(order[start:])
        if self.shuffle:
            batches = [batches[j] for j in rng.permutation(len(batches))]
        return batches

    def __iter__(self) -> Iterator[np.ndarray]:
        """Batches from the current position to the end of the epoch, then the next epoch."""
        batches = self.batches(self.epoch)
        while self.position < len(batches):
            batch = batches[self.position]
            self.position += 1
            yield batch
        self.epoch += 1
        self.position = 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
