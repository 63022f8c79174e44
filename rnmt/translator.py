"""From a checkpoint and lines of text to lines of translations, in input order.

    lines ──Vocabulary.encode──▶ ids ──sorted by length, batched──▶ search ──▶ ids
          ──Vocabulary.decode──▶ lines (original order restored)
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from rnmt.checkpoint import load_checkpoint
from rnmt.data import pad_sentences
from rnmt.errors import CheckpointError
from rnmt.models import ModelConfig, Seq2Seq, build_model
from rnmt.search import Hypothesis, SearchConfig, search
from rnmt.vocab import EOS, Vocabulary


def resolve_device(name: str) -> torch.device:
    """`auto` = CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass
class LoadedModel:
    model: Seq2Seq
    src_vocab: Vocabulary
    tgt_vocab: Vocabulary


def load_model(path: str | Path, device: torch.device) -> LoadedModel:
    """Rebuild a model from a checkpoint alone: no flags about its architecture needed."""
    payload = load_checkpoint(path)
    try:
        config = ModelConfig.from_dict(payload["model_config"])
        model = build_model(config)
        model.load_state_dict(payload["model"])
        src_vocab = Vocabulary.from_state_dict(payload["src_vocab"])
        tgt_vocab = Vocabulary.from_state_dict(payload["tgt_vocab"])
    except (RuntimeError, TypeError, KeyError, ValueError) as err:
        first_line = str(err).strip().splitlines()[0]
        raise CheckpointError(f"{path}: checkpoint does not match its model ({first_line})") from None
    if len(src_vocab) != config.src_vocab_size or len(tgt_vocab) != config.tgt_vocab_size:
        raise CheckpointError(f"{path}: vocabulary sizes do not match the model")
    model.to(device).eval()
    return LoadedModel(model, src_vocab, tgt_vocab)


class Translator:
    """Translates lines with one model. Empty or whitespace-only lines give empty lines."""

    def __init__(
        self,
        loaded: LoadedModel,
        config: SearchConfig,
        device: torch.device,
        batch_size: int = 64,
        buffer_size: int = 2000,
    ) -> None:
        self.model = loaded.model
        self.src_vocab = loaded.src_vocab
        self.tgt_vocab = loaded.tgt_vocab
        self.config = config
        self.device = device
        self.batch_size = batch_size
        self.buffer_size = buffer_size

    @classmethod
    def load(cls, path: str | Path, config: SearchConfig, device: str = "auto",
             batch_size: int = 64) -> "Translator":
        dev = resolve_device(device)
        return cls(load_model(path, dev), config, dev, batch_size)

    def translate_lines(self, lines: Iterable[str]) -> Iterator[str]:
        """Reads `buffer_size` lines at a time, so output starts before the input ends."""
        buffer: list[str] = []
        for line in lines:
            buffer.append(line.rstrip("\r\n"))
            if len(buffer) == self.buffer_size:
                yield from self.translate_batch(buffer)
                buffer = []
        if buffer:
            yield from self.translate_batch(buffer)

    def translate_batch(self, lines: list[str]) -> list[str]:
        hyps = self.hypotheses(lines)
        return [self.tgt_vocab.decode(h.tokens) if h is not None else "" for h in hyps]

    def hypotheses(self, lines: list[str]) -> list[Hypothesis | None]:
        """The best hypothesis per line (None for a blank line), in input order."""
        results: list[Hypothesis | None] = [None] * len(lines)
        ids = self.src_vocab.encode(lines)
        todo = [i for i, line in enumerate(lines) if line.strip() and len(ids[i])]
        todo.sort(key=lambda i: len(ids[i]))  # similar lengths share a batch: little padding
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start : start + self.batch_size]
            src, lengths = pad_sentences([ids[i] for i in chunk], suffix=EOS)
            for i, hyp in zip(chunk, search(self.model, src.to(self.device), lengths,
                                            self.config)):
                results[i] = hyp
        return results
