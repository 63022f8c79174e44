"""Corpus metrics through sacrebleu: BLEU, chrF(++) and TER with signatures, several systems
compared by paired bootstrap resampling, and scores per source-length bucket.

    hypotheses ─┐
    references ─┼─sacrebleu metric─▶ corpus score + signature            (corpus_scores)
                ├─paired bootstrap─▶ p-value of each system vs the first (compare_systems)
    source ─────┴─length buckets───▶ one score per bucket and system     (scores_by_length)

The numbers are sacrebleu's own, computed with the options the `sacrebleu` command uses,
so a score here can be quoted next to one from `sacrebleu` on the same files.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from sacrebleu.metrics import BLEU, CHRF, TER
from sacrebleu.metrics.base import Metric

from rnmt.errors import ConfigError, DataError

METRICS = ("bleu", "chrf", "ter")


@dataclass
class MetricOptions:
    """Which metrics and how: the `sacrebleu` command's options of the same names.

    `tokenize` (BLEU only; None = sacrebleu's default, 13a) and `lowercase` (BLEU and chrF;
    TER is case-insensitive by default, as in sacrebleu). `chrf_word_order` 2 = chrF++.
    """

    metrics: tuple[str, ...] = ("bleu", "chrf")
    tokenize: str | None = None
    lowercase: bool = False
    chrf_word_order: int = 0

    def __post_init__(self) -> None:
        unknown = [m for m in self.metrics if m not in METRICS]
        if unknown or not self.metrics:
            raise ConfigError(
                f"unknown metric {', '.join(unknown) or '(none)'}; choose from {', '.join(METRICS)}"
            )
        if self.tokenize is not None and self.tokenize not in BLEU.TOKENIZERS:
            raise ConfigError(
                f"unknown --tokenize {self.tokenize!r}; choose from {', '.join(BLEU.TOKENIZERS)}"
            )
        if not 0 <= self.chrf_word_order <= CHRF.CHAR_ORDER:
            # sacrebleu loops over the orders (and names the metric chrF+++…): a mistyped
            # large order would run for hours. chrF++ is 2; 6 matches the character order.
            raise ConfigError(f"--chrf-word-order must be between 0 and {CHRF.CHAR_ORDER}")

    def build(self, references: Sequence[Sequence[str]] | None = None) -> dict[str, Metric]:
        """Fresh sacrebleu metric objects by key; `references` are cached inside them."""
        made: dict[str, Metric] = {}
        for key in self.metrics:
            if key == "bleu":
                made[key] = self._bleu(references)
            elif key == "chrf":
                made[key] = CHRF(word_order=self.chrf_word_order, lowercase=self.lowercase,
                                 references=references)
            else:
                made[key] = TER(references=references)
        return made

    def _bleu(self, references: Sequence[Sequence[str]] | None) -> BLEU:
        """sacrebleu's BLEU; a tokenizer it cannot set up here (ja-mecab without its extra,
        flores101 without the network for its model) is a ConfigError naming the option."""
        try:
            return BLEU(tokenize=self.tokenize, lowercase=self.lowercase, references=references)
        except (RuntimeError, OSError, ImportError) as err:
            lines = [line.strip() for line in str(err).splitlines() if line.strip()]
            reason = lines[-1] if lines else type(err).__name__
            raise ConfigError(f"--tokenize {self.tokenize}: sacrebleu cannot use it here "
                              f"({reason})") from None


@dataclass
class MetricResult:
    key: str  # "bleu", "chrf" or "ter"
    name: str  # sacrebleu's name: "BLEU", "chrF2", "chrF2++", "TER"
    score: float
    signature: str
    text: str  # sacrebleu's own one-line rendering, e.g. "BLEU = 31.20 62.1/..."


def check_streams(hypotheses: Sequence[str], references: Sequence[Sequence[str]],
                  hyp_name: str = "hypotheses", ref_names: Sequence[str] | None = None) -> None:
    """Every stream must have the hypotheses' number of lines, and there must be some."""
    if not hypotheses:
        raise DataError(f"{hyp_name}: no hypotheses (empty input)")
    names = list(ref_names) if ref_names is not None else [f"reference {i + 1}"
                                                          for i in range(len(references))]
    for name, ref in zip(names, references):
        if len(ref) != len(hypotheses):
            raise DataError(
                f"line counts differ: {hyp_name} has {len(hypotheses)} lines, "
                f"{name} has {len(ref)}"
            )


def corpus_scores(hypotheses: list[str], references: list[list[str]],
                  options: MetricOptions | None = None) -> list[MetricResult]:
    """Each chosen metric of `hypotheses` against one or more reference streams."""
    options = options or MetricOptions()
    check_streams(hypotheses, references)
    results = []
    for key, metric in options.build().items():
        score = metric.corpus_score(hypotheses, references)
        results.append(MetricResult(key, score.name, float(score.score),
                                    str(metric.get_signature()), str(score)))
    return results


# ---------------------------------------------------------------------------------------
# Several systems: paired bootstrap resampling (Koehn 2004), sacrebleu's implementation
# ---------------------------------------------------------------------------------------


@dataclass
class SystemScore:
    """One metric of one system; `p_value` against the first system (None for the first)."""

    score: float
    p_value: float | None = None
    mean: float | None = None  # bootstrap estimate of the true score
    ci: float | None = None  # half-width of its 95% confidence interval

    def differs(self, alpha: float = 0.05) -> bool:
        return self.p_value is not None and self.p_value < alpha


@dataclass
class Comparison:
    """Systems (first = baseline) by metric key; signatures by metric key."""

    systems: list[str]
    names: dict[str, str]  # metric key -> sacrebleu name ("chrF2++")
    scores: dict[str, list[SystemScore]]
    signatures: dict[str, str]
    samples: int


def compare_systems(systems: Sequence[tuple[str, Sequence[str]]],
                    references: Sequence[Sequence[str]], options: MetricOptions,
                    samples: int = 1000) -> Comparison:
    """Paired bootstrap resampling of every system against the first (sacrebleu's
    `--paired-bs`): draw `samples` resamples of the sentences (with replacement), score
    both systems on each, and take as p-value the share of resamples whose (centred)
    absolute difference exceeds the observed one,

        p = (1 + #{b : |Δ_b - mean(Δ)| > |Δ|}) / (1 + B).

    The seed is sacrebleu's (12345, or the SACREBLEU_SEED environment variable).
    """
    from sacrebleu.significance import PairedTest

    if len(systems) < 2:
        raise ConfigError("--significance needs at least two systems")
    if samples < 1:
        raise ConfigError("--bootstrap-samples must be at least 1")
    for name, hyps in systems:
        check_streams(hyps, references, name)
    metrics = options.build()
    test = PairedTest([(n, list(h)) for n, h in systems], metrics, references,
                      test_type="bs", n_samples=samples)
    signatures, table = test()
    # PairedTest keys its results by the metric's display name, in the order given.
    names = dict(zip(metrics, test.metrics))
    scores = {
        key: [SystemScore(float(r.score), None if r.p_value is None else float(r.p_value),
                          None if r.mean is None else float(r.mean),
                          None if r.ci is None else float(r.ci))
              for r in table[name]]
        for key, name in names.items()
    }
    return Comparison([n for n, _ in systems], names, scores,
                      {key: str(signatures[name]) for key, name in names.items()}, samples)


# ---------------------------------------------------------------------------------------
# Scores by source length (Bahdanau et al. 2015, Fig. 2)
# ---------------------------------------------------------------------------------------


@dataclass
class Bucket:
    """Sentences whose source has `low <= words < high` whitespace words."""

    low: int
    high: float  # math.inf for the last, open bucket
    indices: list[int] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.low}+" if math.isinf(self.high) else f"{self.low}-{int(self.high)}"


def length_buckets(sources: Sequence[str], boundaries: Sequence[int]) -> list[Bucket]:
    """Split sentence indices by source length at `boundaries` (e.g. 10, 20, 30 gives
    0-10, 10-20, 20-30, 30+). Lengths are whitespace words, the same for every system."""
    bounds = list(boundaries)
    if not bounds or any(b <= 0 for b in bounds) or bounds != sorted(set(bounds)):
        raise ConfigError("--buckets must be increasing positive word counts, e.g. 10,20,30")
    edges = [0, *bounds]
    buckets = [Bucket(lo, hi) for lo, hi in zip(edges, [*bounds, math.inf])]
    for i, line in enumerate(sources):
        n = len(line.split())
        for bucket in buckets:
            if bucket.low <= n < bucket.high:
                bucket.indices.append(i)
                break
    return buckets


@dataclass
class LengthReport:
    """scores[metric key][system][bucket]: None where a bucket holds no sentence."""

    systems: list[str]
    buckets: list[Bucket]
    names: dict[str, str]
    scores: dict[str, list[list[float | None]]]
    signatures: dict[str, str]


def scores_by_length(sources: Sequence[str], systems: Sequence[tuple[str, Sequence[str]]],
                     references: Sequence[Sequence[str]], options: MetricOptions,
                     boundaries: Sequence[int] = (10, 20, 30)) -> LengthReport:
    """Every chosen metric of every system on each source-length bucket alone."""
    for name, hyps in systems:
        check_streams(hyps, references, name)
    if len(sources) != len(references[0]):
        raise DataError(f"line counts differ: the source has {len(sources)} lines, "
                        f"the references {len(references[0])}")
    buckets = length_buckets(sources, boundaries)
    metrics = options.build()
    scores: dict[str, list[list[float | None]]] = {key: [] for key in metrics}
    names: dict[str, str] = {}
    for _, hyps in systems:
        for key, metric in metrics.items():
            row: list[float | None] = []
            for bucket in buckets:
                if not bucket.indices:
                    row.append(None)
                    continue
                score = metric.corpus_score([hyps[i] for i in bucket.indices],
                                            [[ref[i] for i in bucket.indices]
                                             for ref in references])
                names[key] = score.name
                row.append(float(score.score))
            scores[key].append(row)
    return LengthReport([n for n, _ in systems], buckets,
                        {k: names.get(k, k) for k in metrics}, scores,
                        {k: str(m.get_signature()) for k, m in metrics.items()})
