"""Ids in, batches out: binarised splits and token-budget batching.

    text lines ──Vocabulary.encode──▶ ids ──TokenArrayWriter (chunk by chunk)──▶ disk (.npy)
    disk ──TokenArray.load──▶ ParallelData ──TokenBatchSampler──▶ collate ──▶ Batch

A binarised side of a split is one flat int32 array of ids plus an int64 offsets array
(sentence i is `ids[offsets[i]:offsets[i+1]]`). Training reads the ids from disk as it
needs them (the offsets memory-mapped, the ids by positioned reads), so a corpus larger
than RAM can be trained on.
"""

from __future__ import annotations

import functools
import hashlib
import os
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from rnmt.errors import DataError
from rnmt.vocab import BOS, EOS, PAD


# ---------------------------------------------------------------------------------------
# Binarised token arrays
# ---------------------------------------------------------------------------------------


class IdsOnDisk:
    """The flat id array of an `.npy` file, read a slice at a time with positioned reads.

    Not memory-mapped: a mapping counts every page of it that training touched as resident
    memory of the process (and the kernel maps up to 64 KB around each page fault), so a
    run's resident memory would grow towards the size of the corpus. Read this way, the
    corpus stays in the kernel's page cache and the process holds the current batch only.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._file = open(self.path, "rb")
        try:
            version = np.lib.format.read_magic(self._file)
            if version not in ((1, 0), (2, 0)):
                raise ValueError(f"unsupported .npy format version {version}")
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, _, dtype = read_header(self._file)
        except ValueError:
            self._file.close()
            raise
        self._start = self._file.tell()
        self.dtype = dtype
        self._length = shape[0] if len(shape) == 1 else -1
        size = os.fstat(self._file.fileno()).st_size
        if self._length < 0 or self._start + self._length * dtype.itemsize > size:
            self._file.close()
            raise ValueError(f"{self.path}: not a complete flat array")

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, span: slice) -> np.ndarray:
        start, stop = int(span.start), int(span.stop)
        size = self.dtype.itemsize
        raw = os.pread(self._file.fileno(), (stop - start) * size, self._start + start * size)
        return np.frombuffer(raw, dtype=self.dtype)


class TokenArray:
    """Sentences of ids as one flat array plus offsets; `arr[i]` is sentence i's ids.

    Loaded from disk, the offsets are memory-mapped (8 bytes per sentence, read once for
    the lengths) and the ids read per sentence (`IdsOnDisk`).
    """

    def __init__(self, ids: np.ndarray | IdsOnDisk, offsets: np.ndarray) -> None:
        self.ids = ids
        self.offsets = offsets

    @classmethod
    def from_sentences(cls, sentences: Sequence[np.ndarray]) -> "TokenArray":
        """An in-memory array of a few sentences (a corpus is written by TokenArrayWriter)."""
        lengths = np.fromiter((len(s) for s in sentences), dtype=np.int64, count=len(sentences))
        offsets = np.zeros(len(sentences) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        ids = (
            np.concatenate(sentences).astype(np.int32)
            if len(sentences)
            else np.zeros(0, np.int32)
        )
        return cls(ids, offsets)

    @classmethod
    def load(cls, prefix: Path) -> "TokenArray":
        try:
            ids = IdsOnDisk(f"{prefix}.ids.npy")
            offsets = np.load(f"{prefix}.offsets.npy", mmap_mode="r")
            if len(offsets) == 0 or offsets[-1] > len(ids):
                raise ValueError("the offsets point past the ids")
        except FileNotFoundError as err:
            raise DataError(f"missing binarised data: {err.filename}") from None
        except ValueError as err:
            raise DataError(f"corrupt binarised data at {prefix}: {err}") from None
        return cls(ids, offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        return self.ids[self.offsets[i] : self.offsets[i + 1]]

    def id_range(self, chunk: int = 1 << 22) -> tuple[int, int]:
        """(smallest, largest) id of all sentences, read a chunk at a time; (0, -1) if
        there are none."""
        begin, end = (int(self.offsets[0]), int(self.offsets[-1])) if len(self) else (0, 0)
        lows, highs = [], []
        for start in range(begin, end, chunk):
            part = self.ids[slice(start, min(start + chunk, end))]
            lows.append(int(part.min()))
            highs.append(int(part.max()))
        return (min(lows), max(highs)) if lows else (0, -1)

    @property
    def lengths(self) -> np.ndarray:
        """Sentence lengths, int32: 4 bytes per sentence, without an int64 copy on the way."""
        lengths = np.empty(len(self), dtype=np.int32)
        np.subtract(self.offsets[1:], self.offsets[:-1], out=lengths, casting="unsafe")
        return lengths


NPY_HEADER_SIZE = 128  # bytes before the data: a multiple of 64, as numpy aligns it


def npy_header(dtype: type[np.generic], count: int) -> bytes:
    """The `.npy` (format 1.0) header of a flat array of `count` items, NPY_HEADER_SIZE
    bytes whatever the count: the dict is padded with spaces to that size (as numpy's own
    writer pads it), so the header can be written before the count is known and
    rewritten in place once it is."""
    descr = np.lib.format.dtype_to_descr(np.dtype(dtype))
    text = f"{{'descr': '{descr}', 'fortran_order': False, 'shape': ({count},), }}"
    prefix = len(np.lib.format.magic(1, 0)) + 2  # magic and version, then a uint16 length
    text = text.ljust(NPY_HEADER_SIZE - prefix - 1) + "\n"
    header = np.lib.format.magic(1, 0) + struct.pack("<H", len(text)) + text.encode("latin1")
    assert len(header) == NPY_HEADER_SIZE, "a count of over 60 digits"
    return header


class TokenArrayWriter:
    """Writes `prefix.ids.npy` and `prefix.offsets.npy` from chunks of sentences, holding
    none of them: ids and offsets are appended to temporary `.npy.tmp` files after a
    header with room for any count, and on `close` the header gets the final count and
    each file its final name (a rename: no second pass over the corpus, and no half
    written `.npy` under the final name), so binarising a corpus needs memory for one
    chunk, not for the corpus. Used as a context manager; on an exception the temporary
    files are removed and no `.npy` file is written.
    """

    def __init__(self, prefix: Path) -> None:
        self.prefix = prefix
        self.sentences = 0
        self.n_ids = 0
        self._ids = open(f"{prefix}.ids.npy.tmp", "wb")
        self._offsets = open(f"{prefix}.offsets.npy.tmp", "wb")
        for raw, dtype in ((self._ids, np.int32), (self._offsets, np.int64)):
            raw.write(npy_header(dtype, 0))  # rewritten with the count on close
        np.zeros(1, np.int64).tofile(self._offsets)

    def append(self, sentences: Sequence[np.ndarray]) -> None:
        if not len(sentences):
            return
        lengths = np.fromiter(map(len, sentences), dtype=np.int64, count=len(sentences))
        np.concatenate(sentences).astype(np.int32, copy=False).tofile(self._ids)
        ends = np.cumsum(lengths)
        ends += self.n_ids
        ends.tofile(self._offsets)
        self.sentences += len(sentences)
        self.n_ids = int(ends[-1])

    def close(self) -> None:
        # Both files complete before either gets its final name: a failure (a full disk)
        # leaves no new ids beside stale or missing offsets.
        try:
            for raw, dtype, count in ((self._ids, np.int32, self.n_ids),
                                      (self._offsets, np.int64, self.sentences + 1)):
                raw.seek(0)
                raw.write(npy_header(dtype, count))
                raw.close()
        except BaseException:
            self.discard()
            raise
        for raw in (self._ids, self._offsets):
            os.replace(raw.name, raw.name.removesuffix(".tmp"))

    def discard(self) -> None:
        for raw in (self._ids, self._offsets):
            raw.close()
            Path(raw.name).unlink(missing_ok=True)

    def __enter__(self) -> "TokenArrayWriter":
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None:
            self.close()
        else:
            self.discard()


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
    `indices` are the sentences' positions in their split. `real` (n_real,) indexes the
    real (non-pad) positions of the flattened `tgt_out` (batch · tgt_len), in row order:
    built on the host at collation, so that selecting them on a GPU needs no host sync
    (a boolean mask would: its size is only known after a device-side count).
    """

    src: Tensor
    src_lengths: Tensor
    tgt_in: Tensor | None
    tgt_out: Tensor | None
    indices: Tensor
    real: Tensor | None = None

    @property
    def num_tgt_tokens(self) -> int:
        assert self.real is not None
        return self.real.numel()

    def real_targets(self) -> Tensor:
        """The real target pieces, (n_real,), in `real`'s order."""
        assert self.tgt_out is not None and self.real is not None
        return self.tgt_out.view(-1).index_select(0, self.real)

    def to(self, device: torch.device) -> "Batch":
        """The batch with its id tensors on `device`. To CUDA, through pinned memory: the
        copy then runs asynchronously (non_blocking) and the host goes on preparing the
        next batch (from pageable memory it would wait for the copy)."""
        pin = torch.device(device).type == "cuda"

        def move(t: Tensor | None) -> Tensor | None:
            if t is None:
                return None
            if pin and t.device.type == "cpu":
                t = t.pin_memory()
            return t.to(device, non_blocking=True)

        return Batch(
            move(self.src),
            self.src_lengths,  # lengths stay on the CPU, as pack_padded_sequence wants
            move(self.tgt_in),
            move(self.tgt_out),
            self.indices,
            move(self.real),
        )


def pad_sentences(sentences: Sequence[np.ndarray | Sequence[int]], prefix: int | None = None,
                  suffix: int | None = None) -> tuple[Tensor, Tensor]:
    """Sentences of ids -> (batch, max_len) long tensor padded with PAD, and their lengths."""
    start = int(prefix is not None)
    sizes = np.fromiter((len(s) for s in sentences), dtype=np.int64, count=len(sentences))
    lengths = sizes + start + int(suffix is not None)
    out = np.full((len(sentences), int(lengths.max(initial=0))), PAD, dtype=np.int64)
    if len(sentences):
        # Every id in one scatter: a loop of per-row slice copies took ~3.4 ms of each
        # reference-model training batch (166 sentences, three calls), 1% of a bf16 step.
        rows = np.repeat(np.arange(len(sentences)), sizes)
        cols = np.arange(sizes.sum()) - np.repeat(np.cumsum(sizes) - sizes, sizes) + start
        out[rows, cols] = np.concatenate(sentences).astype(np.int64, copy=False)
        if prefix is not None:
            out[:, 0] = prefix
        if suffix is not None:
            out[np.arange(len(sentences)), sizes + start] = suffix
    return torch.from_numpy(out), torch.from_numpy(lengths)


def collate(data: ParallelData, indices: Sequence[int]) -> Batch:
    """Gather sentences `indices` of a split into one padded batch (source gets `</s>`)."""
    sources = [data.src[i] for i in indices]
    src, src_lengths = pad_sentences(sources, suffix=EOS)
    tgt_in = tgt_out = real = None
    if data.tgt is not None:
        # A language model's data is one side: its sentences are read from disk once.
        targets = sources if data.tgt is data.src else [data.tgt[i] for i in indices]
        tgt_in, _ = pad_sentences(targets, prefix=BOS)
        tgt_out, _ = pad_sentences(targets, suffix=EOS)
        real = (tgt_out.view(-1) != PAD).nonzero().squeeze(1)
    return Batch(src, src_lengths, tgt_in, tgt_out, torch.tensor(list(indices), dtype=torch.long),
                 real)


class TokenBatchSampler:
    """Batches of sentence indices under a token budget, from length-sorted buckets.

    Sentences are sorted by target length, then by source length (rising within even
    target lengths, falling within odd ones, so that a batch straddling two target lengths
    holds sources of similar length: on Multi30k 6.9 % source padding instead of 9.8 %),
    with random tie-breaking, cut into batches whose padded size
    `n_sentences * max(len + 1)` stays within `max_tokens` on either side, and the batches
    are shuffled. Every epoch re-draws the order from
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
        # int32 (+ </s>): these and one epoch's order are all the sampler keeps per pair,
        # 12 bytes, so resident memory stays small however many lines the corpus has.
        self.src_lengths = np.array(src_lengths, dtype=np.int32)
        self.src_lengths += 1
        if tgt_lengths is None:
            self.tgt_lengths = self.src_lengths
        else:
            self.tgt_lengths = np.array(tgt_lengths, dtype=np.int32)
            self.tgt_lengths += 1
        self.max_tokens = max_tokens
        self.max_sentences = max_sentences or len(self.src_lengths) or 1
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.position = 0  # batches of the current epoch already handed out
        # The last epoch's batches: start-up asks for epoch 0's several times (the batch
        # count, the data-parallel check, training itself), and building them sorts the
        # whole corpus.
        self._cached: tuple[int, list[np.ndarray]] | None = None

    def batches(self, epoch: int) -> list[np.ndarray]:
        """All batches of one epoch, in the order they are trained. Computed once per epoch
        and shared between calls: read them, do not modify them."""
        if self._cached is not None and self._cached[0] == epoch:
            return self._cached[1]
        self._cached = None  # drop the old epoch's order before sorting the new one
        batches = self._build(epoch)
        self._cached = (epoch, batches)
        return batches

    def _build(self, epoch: int) -> list[np.ndarray]:
        """Epoch `epoch`'s batches, drawn from `seed + epoch` (see the class)."""
        rng = np.random.default_rng(self.seed + epoch)
        n = len(self.src_lengths)
        index = np.int32 if n < 2**31 else np.int64
        tie = rng.permutation(np.arange(n, dtype=index)) if self.shuffle else np.arange(n)
        # Source lengths run up within one target length and down within the next, so a
        # batch that straddles two target lengths joins sources of similar length.
        src_key = np.where(self.tgt_lengths % 2 == 0, self.src_lengths, -self.src_lengths)
        order = np.lexsort((tie, src_key, self.tgt_lengths)).astype(index)
        del src_key, tie
        bounds = self._cut(np.maximum(self.src_lengths, self.tgt_lengths)[order])
        batches = [order[a:b] for a, b in zip(bounds, bounds[1:])]
        if self.shuffle:
            batches = [batches[j] for j in rng.permutation(len(batches))]
        return batches

    def _cut(self, longest: np.ndarray) -> list[int]:
        """Batch boundaries in sorted order: each batch takes sentences while
        `size * running max of longest` stays within `max_tokens` and `size` within
        `max_sentences` (its first sentence always, even one over the budget).

        One vectorised test per batch, not per sentence: no batch starting with a sentence
        of length L holds more than `max_tokens // L` of them (the running max only grows),
        so the first size that breaks a limit lies within that window.
        """
        bounds, start, n = [0], 0, len(longest)
        while start < n:
            window = min(self.max_tokens // int(longest[start]), self.max_sentences) + 1
            running = np.maximum.accumulate(longest[start : start + window])
            sizes = np.arange(1, len(running) + 1, dtype=np.int64)
            over = (sizes * running > self.max_tokens) | (sizes > self.max_sentences)
            over[0] = False
            start += int(np.argmax(over)) if over.any() else len(running)
            bounds.append(start)
        return bounds

    def __iter__(self) -> Iterator[np.ndarray]:
        """Batches from the current position to the end of the epoch, then the next epoch."""
        batches = self.batches(self.epoch)
        while self.position < len(batches):
            batch = batches[self.position]
            self.position += 1
            yield batch
        self.epoch += 1
        self.position = 0

    @functools.cached_property  # every save asks; hashing 10M lengths takes ~0.1 s
    def fingerprint(self) -> str:
        """What an epoch's batches depend on besides the epoch: the sentence lengths, the
        budgets and the seed. A position means the same batches only under the same one."""
        digest = hashlib.sha1(self.src_lengths.tobytes())
        digest.update(self.tgt_lengths.tobytes())
        return (f"{len(self.src_lengths)} pairs, max_tokens {self.max_tokens}, max_sentences "
                f"{self.max_sentences}, seed {self.seed}, lengths {digest.hexdigest()[:12]}")

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "batching": self.fingerprint}

    def load_state_dict(self, state: dict) -> bool:
        """Continue at the saved epoch and position. When the data or the batching have
        changed since (another corpus, --max-tokens or --seed given again), the saved
        position counts other batches: the saved epoch then starts over on the new ones,
        and this returns False."""
        self.epoch = int(state["epoch"])
        saved = state.get("batching")  # absent from checkpoints before it was kept
        same = saved is None or saved == self.fingerprint
        self.position = int(state["position"]) if same else 0
        return same
