"""Corpus metrics through sacrebleu: BLEU and chrF on detokenised text, with signatures."""

from __future__ import annotations

from dataclasses import dataclass

from sacrebleu.metrics import BLEU, CHRF

from rnmt.errors import DataError


@dataclass
class MetricResult:
    key: str  # "bleu" or "chrf"
    name: str
    score: float
    signature: str
    text: str  # sacrebleu's own one-line rendering, e.g. "BLEU = 31.20 62.1/..."


def corpus_scores(hypotheses: list[str], references: list[list[str]]) -> list[MetricResult]:
    """BLEU (13a, cased) and chrF of `hypotheses` against one or more reference streams."""
    for ref in references:
        if len(ref) != len(hypotheses):
            raise DataError(
                f"hypotheses have {len(hypotheses)} lines but a reference has {len(ref)}"
            )
    results = []
    for key, metric in (("bleu", BLEU()), ("chrf", CHRF())):
        score = metric.corpus_score(hypotheses, references)
        results.append(MetricResult(key, score.name, float(score.score),
                                    str(metric.get_signature()), str(score)))
    return results
