"""Vocabularies: sentencepiece segmentation plus rnmt's own id space.

Text is cut into pieces by a sentencepiece model (trained here, or trained elsewhere and
reused for a like-for-like comparison with another toolkit). The model's softmax does not
range over every piece of that sentencepiece model but over the pieces that occur in the
training text of one side (as OpenNMT-py and Joey NMT build theirs), after four special ids:

    pad = 0, unk = 1, bos = 2, eos = 3

A `Vocabulary` therefore holds the sentencepiece model (as bytes, so that a checkpoint is
self-contained) and the list of pieces in rnmt id order; encoding maps sentencepiece ids to
rnmt ids through one lookup table, so any sentencepiece model works whatever its own ids.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import sentencepiece as spm

from rnmt.errors import DataError, VocabularyMismatch

PAD, UNK, BOS, EOS = 0, 1, 2, 3
SPECIALS = ("<pad>", "<unk>", "<s>", "</s>")


def check_vocab_size(vocab_size: int) -> None:
    """A DataError for a size that leaves sentencepiece no piece beyond the specials."""
    if vocab_size <= len(SPECIALS):
        raise DataError(f"--vocab-size {vocab_size}: sentencepiece needs more than the "
                        f"{len(SPECIALS)} special pieces")


def train_sentencepiece(
    lines: Iterable[str],
    vocab_size: int,
    model_type: str = "unigram",
    character_coverage: float = 1.0,
    max_sentences: int = 2_000_000,
    threads: int = 2,
) -> bytes:
    """Train a sentencepiece model in memory and return its serialised proto.

    The special ids are set to rnmt's (pad 0, unk 1, bos 2, eos 3). `vocab_size` is a soft
    limit, so a tiny corpus yields a smaller model instead of an error. It must leave room
    for the specials and every character of the text (character_coverage 1.0), or this is
    a DataError saying how many that takes.
    """
    check_vocab_size(vocab_size)
    buffer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=(line for line in lines if line.strip()),
            model_writer=buffer,
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=character_coverage,
            pad_id=PAD,
            unk_id=UNK,
            bos_id=BOS,
            eos_id=EOS,
            hard_vocab_limit=False,
            input_sentence_size=max_sentences,
            shuffle_input_sentence=True,
            num_threads=threads,
            minloglevel=2,
        )
    except RuntimeError as err:
        # "... Vocabulary size is smaller than required_chars. 8 vs 36. ..."
        needed = re.search(r"required_chars\. \d+ vs (\d+)", str(err))
        if needed:
            raise DataError(f"--vocab-size {vocab_size} is too small for this text: its "
                            f"characters and the special pieces take {needed.group(1)}; "
                            f"choose at least that") from None
        detail = str(err).split("] ", 1)[-1].strip().splitlines()[0]
        raise DataError(f"sentencepiece cannot learn {vocab_size} pieces from this text "
                        f"({detail})") from None
    return buffer.getvalue()


def load_sentencepiece(proto: bytes) -> spm.SentencePieceProcessor:
    processor = spm.SentencePieceProcessor()
    processor.LoadFromSerializedProto(proto)
    return processor


@dataclass
class Vocabulary:
    """Pieces in rnmt id order (`pieces[i]` is the piece of id i) and their segmenter.

    `pieces[:4]` are the specials; the rest are sentencepiece pieces. Ids of pieces not in
    the list (pieces the training text never showed) encode to `UNK`.
    """

    spm_proto: bytes
    pieces: list[str]
    _spm: spm.SentencePieceProcessor = field(init=False, repr=False)
    _to_rnmt: np.ndarray = field(init=False, repr=False)  # spm id -> rnmt id
    _to_spm: np.ndarray = field(init=False, repr=False)  # rnmt id -> spm id

    def __post_init__(self) -> None:
        self._spm = load_sentencepiece(self.spm_proto)
        n_spm = self._spm.GetPieceSize()
        self._to_rnmt = np.full(n_spm, UNK, dtype=np.int64)
        self._to_spm = np.full(len(self.pieces), self._spm.unk_id(), dtype=np.int64)
        for rnmt_id, piece in enumerate(self.pieces[len(SPECIALS) :], start=len(SPECIALS)):
            spm_id = self._spm.PieceToId(piece)
            if spm_id == self._spm.unk_id() and piece != self._spm.IdToPiece(spm_id):
                raise VocabularyMismatch(f"piece {piece!r} is not in the sentencepiece model")
            self._to_rnmt[spm_id] = rnmt_id
            self._to_spm[rnmt_id] = spm_id

    @classmethod
    def build(cls, spm_proto: bytes, corpus: Iterable[str], threads: int = 2) -> "Vocabulary":
        """The pieces that occur in `corpus`, most frequent first (ties by spm id)."""
        processor = load_sentencepiece(spm_proto)
        counts = np.zeros(processor.GetPieceSize(), dtype=np.int64)
        for chunk in _chunks(corpus, 50_000):
            ids = processor.encode(chunk, out_type=int, num_threads=threads)
            flat = np.fromiter((i for sent in ids for i in sent), dtype=np.int64)
            counts += np.bincount(flat, minlength=len(counts))
        for spm_id in range(processor.GetPieceSize()):
            # Control and unknown pieces never reach the softmax as ordinary pieces.
            if processor.IsControl(spm_id) or processor.IsUnknown(spm_id):
                counts[spm_id] = 0
        seen = np.flatnonzero(counts)
        order = seen[np.argsort(-counts[seen], kind="stable")]
        pieces = list(SPECIALS) + [processor.IdToPiece(int(i)) for i in order]
        return cls(spm_proto, pieces)

    def __len__(self) -> int:
        return len(self.pieces)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Vocabulary)
            and self.pieces == other.pieces
            and self.spm_proto == other.spm_proto
        )

    def encode(self, lines: Sequence[str], threads: int = 1) -> list[np.ndarray]:
        """Text -> rnmt ids (no bos/eos). Shapes: one int64 array (n_pieces,) per line."""
        spm_ids = self._spm.encode(list(lines), out_type=int, num_threads=threads)
        return [self._to_rnmt[np.asarray(ids, dtype=np.int64)] for ids in spm_ids]

    def to_pieces(self, ids: Iterable[int]) -> list[str]:
        return [self.pieces[i] for i in ids]

    def decode(self, ids: Iterable[int]) -> str:
        """rnmt ids -> detokenised text; specials other than unk are dropped."""
        kept = [i for i in ids if i == UNK or i >= len(SPECIALS)]
        return self._spm.decode_ids([int(self._to_spm[i]) for i in kept])

    def state_dict(self) -> dict:
        """Tensors-and-plain-values form for checkpoints and meta files."""
        return {"spm_proto": self.spm_proto, "pieces": list(self.pieces)}

    @classmethod
    def from_state_dict(cls, state: dict) -> "Vocabulary":
        return cls(bytes(state["spm_proto"]), list(state["pieces"]))


def _chunks(items: Iterable[str], size: int) -> Iterable[list[str]]:
    chunk: list[str] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
