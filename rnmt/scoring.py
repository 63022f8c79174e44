"""Model scores by forced decoding: how probable a model finds given target sentences.

The log-probability of a target y = y_1 … y_n under a model, `</s>` included as y_{n+1}, is

    log p(y | x) = Σ_{t=1}^{n+1} log p(y_t | y_<t, x)

computed with teacher forcing: one call `model(src, src_lengths, tgt_in)` with
`tgt_in = <s> y_1 … y_n` gives the logits of every position at once, and the log-softmax
is read at `tgt_out = y_1 … y_n </s>`. It is the same number beam search reports as a
hypothesis' raw score. The corpus perplexity is exp of the mean negative log-probability
per target piece (`</s>` counted):

    PPL = exp(- Σ_s log p(y_s | x_s) / Σ_s (|y_s| + 1))

A language model (`arch == "lm"`) has no source: its text is the target side, and its
`forward` gets a dummy (batch, 1) source that it ignores.

Re-ranking an n-best list (`translate --nbest`, lines `index<TAB>score<TAB>text`) scores
every candidate with one or more models and keeps, per input sentence, the candidate with
the best combination

    s(y) = combine_m log p_m(y | x) + w · s_orig(y)       combine = sum or mean
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from rnmt.data import pad_sentences
from rnmt.device import resolve_device
from rnmt.errors import ConfigError, DataError
from rnmt.text import read_lines
from rnmt.translator import LoadedModel, load_model
from rnmt.vocab import BOS, EOS, PAD


@dataclass
class SentenceScore:
    """log p(y | x), `</s>` included, over `tokens` = |y| + 1 target pieces."""

    log_prob: float
    tokens: int

    @property
    def per_token(self) -> float:
        return self.log_prob / self.tokens


def perplexity(scores: Sequence[SentenceScore]) -> float:
    """exp of the mean negative log-probability per target piece over all sentences."""
    tokens = sum(s.tokens for s in scores)
    if tokens == 0:
        raise DataError("no sentences to compute a perplexity over")
    return math.exp(-sum(s.log_prob for s in scores) / tokens)


@torch.no_grad()
def score_ids(model, sources: Sequence[np.ndarray] | None, targets: Sequence[np.ndarray],
              device: torch.device, batch_size: int = 64) -> list[SentenceScore]:
    """Forced-decoding scores of `targets` given `sources` (None: a language model).

    Sentences are sorted by length so a batch holds similar lengths; results come back
    in input order. Shapes inside: src (batch, src_len), tgt_in/tgt_out (batch, tgt_len),
    logits (batch, tgt_len, vocab).
    """
    if sources is not None and len(sources) != len(targets):
        raise DataError(f"line counts differ: {len(sources)} sources, {len(targets)} targets")
    if batch_size < 1:
        raise ConfigError("--batch-size must be at least 1")
    order = sorted(range(len(targets)), key=lambda i: (
        len(targets[i]), 0 if sources is None else len(sources[i])))
    results: list[SentenceScore | None] = [None] * len(targets)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        tgt_in, _ = pad_sentences([targets[i] for i in chunk], prefix=BOS)
        tgt_out, lengths = pad_sentences([targets[i] for i in chunk], suffix=EOS)
        if sources is None:
            # A language model ignores its source; the protocol still takes one.
            src = torch.full((len(chunk), 1), EOS, dtype=torch.long)
            src_lengths = torch.ones(len(chunk), dtype=torch.long)
        else:
            src, src_lengths = pad_sentences([sources[i] for i in chunk], suffix=EOS)
        logits = model(src.to(device), src_lengths, tgt_in.to(device))
        tgt_out = tgt_out.to(device)
        # fp32 before the softmax: sentence scores sum many small terms.
        log_probs = F.log_softmax(logits.float(), dim=-1)
        picked = log_probs.gather(-1, tgt_out.unsqueeze(-1)).squeeze(-1)
        sums = picked.masked_fill(tgt_out == PAD, 0.0).sum(dim=1)
        for i, total, n in zip(chunk, sums.tolist(), lengths.tolist()):
            results[i] = SentenceScore(total, n)
    return [r for r in results if r is not None]


class ForcedScorer:
    """One checkpoint, ready to score lines of text (translation pairs, or LM text)."""

    def __init__(self, loaded: LoadedModel, device: torch.device, batch_size: int = 64,
                 name: str = "model") -> None:
        self.loaded = loaded
        self.device = device
        self.batch_size = batch_size
        self.name = name

    @classmethod
    def load(cls, path: str | Path, device: str = "auto", batch_size: int = 64
             ) -> "ForcedScorer":
        dev = resolve_device(device)
        return cls(load_model(path, dev), dev, batch_size, str(path))

    @property
    def is_language_model(self) -> bool:
        return self.loaded.is_language_model

    def score_lines(self, targets: Sequence[str], sources: Sequence[str] | None = None
                    ) -> list[SentenceScore]:
        """Scores of target lines; `sources` are required by (and only used by) a
        translation model."""
        if self.is_language_model:
            sources = None
        elif sources is None:
            raise ConfigError(f"{self.name} is a translation model: give the source with --src")
        tgt_ids = self.loaded.tgt_vocab.encode(list(targets))
        src_ids = None if sources is None else self.loaded.src_vocab.encode(list(sources))
        return score_ids(self.loaded.model, src_ids, tgt_ids, self.device, self.batch_size)


# ---------------------------------------------------------------------------------------
# n-best re-ranking
# ---------------------------------------------------------------------------------------


@dataclass
class Candidate:
    """One line of an n-best file: the input line it translates, its score, its text."""

    index: int
    score: float
    text: str
    model_scores: list[float] | None = None
    total: float | None = None


def read_nbest(path: str | Path) -> list[Candidate]:
    """Lines `index<TAB>score<TAB>text` (index: 0-based input line), as `translate --nbest`
    writes them. Malformed lines are a `DataError` naming the file and line."""
    lines = read_lines(path, errors="strict").lines
    candidates = []
    for number, line in enumerate(lines, start=1):
        parts = line.split("\t", 2)
        try:
            if len(parts) != 3:
                raise ValueError
            index, score = int(parts[0]), float(parts[1])
            if index < 0:
                raise ValueError
        except ValueError:
            raise DataError(
                f"{path}: line {number}: expected 'index<TAB>score<TAB>text' "
                "(as written by translate --nbest)"
            ) from None
        candidates.append(Candidate(index, score, parts[2]))
    if not candidates:
        raise DataError(f"{path}: no candidates (empty n-best file)")
    return candidates


def rescore_nbest(candidates: list[Candidate], scorers: Sequence[ForcedScorer],
                  sources: Sequence[str] | None = None, combine: str = "sum",
                  weight: float = 0.0, num_sentences: int | None = None
                  ) -> list[Candidate | None]:
    """The best candidate per input sentence under s(y) = combine_m log p_m(y|x) + w·s_orig.

    Returns one entry per input sentence (None where the n-best list has none); every
    candidate gets its `model_scores` and `total` filled in.
    """
    if combine not in ("sum", "mean"):
        raise ConfigError(f"unknown --combine {combine!r}; choose from sum, mean")
    if not scorers:
        raise ConfigError("re-ranking needs at least one model (-m)")
    n = num_sentences if num_sentences is not None else (
        len(sources) if sources is not None else max(c.index for c in candidates) + 1)
    for c in candidates:
        if c.index >= n:
            raise DataError(f"n-best index {c.index} is beyond the {n} input sentences")
    texts = [c.text for c in candidates]
    cand_sources = None if sources is None else [sources[c.index] for c in candidates]
    per_model = [[s.log_prob for s in scorer.score_lines(texts, cand_sources)]
                 for scorer in scorers]
    best: list[Candidate | None] = [None] * n
    for j, c in enumerate(candidates):
        c.model_scores = [scores[j] for scores in per_model]
        combined = sum(c.model_scores)
        if combine == "mean":
            combined /= len(c.model_scores)
        c.total = combined + weight * c.score
        current = best[c.index]
        if current is None or c.total > float(current.total):  # type: ignore[arg-type]
            best[c.index] = c
    return best
