"""`rnmt score`: sacrebleu metrics of one or more systems, significance, scores by source
length, and model scores by forced decoding (translation pairs, LM text, n-best re-ranking).

Tables go to a rich table on a terminal and to tab-separated lines when piped. The core is
imported inside the functions, and metrics alone (no -m) read text with `rnmt.text`: neither
`rnmt --help` nor `rnmt score --ref r hyp` waits for torch.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from rnmt.errors import ConfigError


# The options of each of score's modes, by parameter name: given in another mode, each is
# named in a warning (`rnmt_cli.main.warn_unused`).
METRIC_OPTIONS = ("metrics", "tokenize", "lowercase", "chrf_word_order", "bootstrap_samples",
                  "buckets")
MODEL_SCORE_OPTIONS = ("batch_size", "device")
RESCORE_OPTIONS = ("nbest_weight", "combine")


def score(
    ctx: typer.Context,
    hypotheses: Annotated[Optional[list[Path]], typer.Argument(
        help="System output(s), one line per reference line; the first is the baseline. "
             "stdin when omitted. With -m: the target text to score.",
        show_default=False)] = None,
    ref: Annotated[list[Path], typer.Option(
        "--ref", "-r", help="Reference file; repeat for several references.")] = [],  # noqa: B006
    metrics: Annotated[str, typer.Option(
        help="Comma-separated metrics among bleu, chrf, ter.")] = "bleu,chrf",
    tokenize: Annotated[Optional[str], typer.Option(
        help="BLEU tokenizer (sacrebleu's: 13a, intl, zh, ja-mecab, char, none, …); "
             "default 13a.")] = None,
    lowercase: Annotated[bool, typer.Option(
        "--lowercase", help="Case-insensitive BLEU and chrF (TER is case-insensitive "
                            "already, as in sacrebleu).")] = False,
    chrf_word_order: Annotated[int, typer.Option(
        help="chrF word n-gram order: 0 = chrF, 2 = chrF++.")] = 0,
    significance: Annotated[bool, typer.Option(
        "--significance", help="Paired bootstrap resampling (sacrebleu's) of every system "
                               "against the first; p < 0.05 marked '*'. Seed: "
                               "SACREBLEU_SEED (default 12345).")] = False,
    bootstrap_samples: Annotated[int, typer.Option(
        help="Resamples for --significance.")] = 1000,
    src: Annotated[Optional[Path], typer.Option(
        "--src", "-s", help="Source file: for --by-length, and the source side for -m.")] = None,
    by_length: Annotated[bool, typer.Option(
        "--by-length", help="Scores per source-length bucket (whitespace words), every "
                            "system side by side; needs --src.")] = False,
    buckets: Annotated[str, typer.Option(
        help="Bucket boundaries in source words: 10,20,30 = 0-10, 10-20, 20-30, 30+.")
    ] = "10,20,30",
    plot: Annotated[Optional[Path], typer.Option(
        help="With --by-length: draw the buckets to this image (needs matplotlib: "
             "pip install 'rnmt\\[plot]').")] = None,
    model: Annotated[list[Path], typer.Option(
        "--model", "-m", help="Checkpoint for model scores (forced decoding); repeat for "
                              "several with --nbest-rescore.")] = [],  # noqa: B006
    nbest_rescore: Annotated[Optional[Path], typer.Option(
        help="n-best file from `translate --nbest` (index<TAB>score<TAB>text) to re-rank "
             "with the -m models; prints the best candidate per input line.")] = None,
    nbest_weight: Annotated[float, typer.Option(
        help="Weight of the n-best file's own score added to the models' score.")] = 0.0,
    combine: Annotated[str, typer.Option(
        help="How several models' log-probabilities combine: sum or mean.")] = "sum",
    batch_size: Annotated[int, typer.Option(
        help="Sentences per batch for model scores (sorted by length).")] = 64,
    device: Annotated[str, typer.Option(help="auto (CUDA if present), cpu or cuda.")] = "auto",
    errors: Annotated[str, typer.Option(
        help="Invalid UTF-8 in an input: strict (stop, naming file and line) or replace.")
    ] = "strict",
    json_output: Annotated[bool, typer.Option(
        "--json", help="Print machine-readable JSON.")] = False,
) -> None:
    """Score translations against references, compare systems, or score text with a model."""
    from rnmt.text import check_error_policy
    from rnmt_cli.main import warn_not_used, warn_unused

    check_error_policy(errors)
    files = list(hypotheses or [])
    if model:
        if by_length or significance or plot:
            raise ConfigError("--by-length, --significance and --plot compare systems; "
                              "they do not combine with -m")
        if nbest_rescore is not None:
            warn_not_used([str(path) for path in files],
                          "--nbest-rescore re-ranks the n-best file")
            warn_unused(ctx, ("ref", *METRIC_OPTIONS),
                        "--nbest-rescore re-ranks the n-best file by model scores")
            _rescore(model, nbest_rescore, src, nbest_weight, combine, batch_size, device,
                     errors, json_output)
        else:
            warn_unused(ctx, METRIC_OPTIONS + RESCORE_OPTIONS,
                        "-m gives model scores (forced decoding), not metrics")
            _model_scores(model, files, ref, src, batch_size, device, errors, json_output)
        return
    if nbest_rescore is not None:
        raise ConfigError("--nbest-rescore needs the model(s) to re-rank with (-m)")
    warn_unused(ctx, MODEL_SCORE_OPTIONS + RESCORE_OPTIONS, "for model scores (-m) only")
    if not significance:
        warn_unused(ctx, ("bootstrap_samples",), "for --significance only")
    if not by_length:
        warn_unused(ctx, ("src", "buckets"), "for --by-length only")
    _metric_report(files, ref, metrics, tokenize, lowercase, chrf_word_order, significance,
                   bootstrap_samples, src, by_length, buckets, plot, errors, json_output)


# ---------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------


def _metric_report(files: list[Path], ref: list[Path], metrics: str, tokenize: str | None,
                   lowercase: bool, chrf_word_order: int, significance: bool, samples: int,
                   src: Path | None, by_length: bool, buckets: str, plot: Path | None,
                   errors: str, json_output: bool) -> None:
    from rnmt.text import read_lines
    from rnmt.evaluation import (MetricOptions, check_streams, compare_systems,
                                 corpus_scores, scores_by_length)

    if not ref:
        raise ConfigError("give the reference(s) with --ref (or a model with -m)")
    if plot is not None and not by_length:
        raise ConfigError("--plot draws the --by-length report; add --by-length")
    if by_length and src is None:
        raise ConfigError("--by-length needs the source file (--src)")
    # As written, in any case, each once: "BLEU,chrf,bleu" is bleu and chrf.
    names = tuple(dict.fromkeys(m.strip().lower() for m in metrics.split(",") if m.strip()))
    options = MetricOptions(names, tokenize, lowercase, chrf_word_order)
    boundaries = _parse_buckets(buckets) if by_length else []

    refs = [read_lines(path, errors).lines for path in ref]
    systems = [(name, lines) for name, lines in _read_systems(files, errors)]
    for name, lines in systems:
        check_streams(lines, refs, name, [str(p) for p in ref])
    sources = None
    if src is not None and by_length:
        sources = read_lines(src, errors).lines
        check_streams(systems[0][1], [sources], systems[0][0], [str(src)])

    if len(systems) == 1 and not (significance or by_length):
        results = corpus_scores(systems[0][1], refs, options)
        if json_output:
            print(json.dumps({r.key: {"name": r.name, "score": round(r.score, 4),
                                      "signature": r.signature} for r in results}))
        else:
            for r in results:
                print(f"{r.text}\t{r.signature}")
        return

    report: dict[str, Any] = {}
    tables: list[tuple[str, list[str], list[list[str]]]] = []
    if significance:
        comparison = compare_systems(systems, refs, options, samples)
        report["systems"] = [
            {"name": name, **{key: {"name": comparison.names[key],
                                    "score": round(scores[i].score, 4),
                                    "mean": _round(scores[i].mean), "ci": _round(scores[i].ci),
                                    "p_value": _round(scores[i].p_value),
                                    "differs": scores[i].differs(),
                                    "signature": comparison.signatures[key]}
                              for key, scores in comparison.scores.items()}}
            for i, name in enumerate(comparison.systems)
        ]
        header = ["system"]
        for key in comparison.scores:
            header += [f"{comparison.names[key]} (μ ± 95% CI)", "p"]
        rows = []
        for i, name in enumerate(comparison.systems):
            cells = [name if i else f"baseline: {name}"]
            for scores in comparison.scores.values():
                s = scores[i]
                cells.append(f"{s.score:.2f} ({s.mean:.2f} ± {s.ci:.2f})")
                cells.append("-" if s.p_value is None
                             else f"{s.p_value:.4f}{'*' if s.differs() else ''}")
            rows.append(cells)
        title = (f"paired bootstrap resampling, {samples} samples: '*' = differs from the "
                 "baseline (p < 0.05)")
        tables.append((title, header, rows))
    elif not by_length or len(systems) > 1:
        per_system = [(name, corpus_scores(lines, refs, options)) for name, lines in systems]
        report["systems"] = [
            {"name": name, **{r.key: {"name": r.name, "score": round(r.score, 4),
                                      "signature": r.signature} for r in results}}
            for name, results in per_system
        ]
        header = ["system"] + [r.name for r in per_system[0][1]]
        rows = [[name] + [f"{r.score:.2f}" for r in results] for name, results in per_system]
        tables.append(("corpus scores", header, rows))
    if by_length:
        assert sources is not None
        lengths = scores_by_length(sources, systems, refs, options, boundaries)
        report["by_length"] = {
            "buckets": [{"label": b.label, "low": b.low,
                         "high": None if math.isinf(b.high) else int(b.high),
                         "sentences": len(b.indices)} for b in lengths.buckets],
            "systems": lengths.systems,
            "scores": {key: {"name": lengths.names[key],
                             "signature": lengths.signatures[key],
                             "by_system": [[_round(v) for v in row] for row in rows_]}
                       for key, rows_ in lengths.scores.items()},
        }
        header = ["source words", "sentences"] + [
            f"{lengths.names[key]} {name}" if len(systems) > 1 else lengths.names[key]
            for name in lengths.systems for key in lengths.scores]
        rows = []
        for b_i, bucket in enumerate(lengths.buckets):
            cells = [bucket.label, str(len(bucket.indices))]
            for s_i in range(len(lengths.systems)):
                for key in lengths.scores:
                    value = lengths.scores[key][s_i][b_i]
                    cells.append("-" if value is None else f"{value:.2f}")
            rows.append(cells)
        tables.append(("scores by source length", header, rows))
        if plot is not None:
            _plot_by_length(lengths, plot)

    if json_output:
        print(json.dumps(report))
        return
    for title, header, rows in tables:
        _print_table(title, header, rows)
    signatures = {}
    if significance:
        signatures = {comparison.names[k]: v for k, v in comparison.signatures.items()}
    elif "systems" in report:
        signatures = {v["name"]: v["signature"] for k, v in report["systems"][0].items()
                      if isinstance(v, dict)}
    elif by_length:
        signatures = {lengths.names[k]: v for k, v in lengths.signatures.items()}
    for name, signature in signatures.items():
        print(f"{name}\t{signature}")


def _read_systems(files: list[Path], errors: str) -> list[tuple[str, list[str]]]:
    from rnmt.text import decode_lines, read_lines

    if not files:
        return [("<stdin>", decode_lines(sys.stdin.buffer.read(), "<stdin>", errors).lines)]
    return [(str(path), read_lines(path, errors).lines) for path in files]


def _parse_buckets(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"--buckets {text!r}: expected increasing word counts, "
                          "e.g. 10,20,30") from None


def _round(value: float | None) -> float | None:
    return None if value is None else round(float(value), 4)


def _print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    """A rich table on a terminal; tab-separated lines (header first) when piped."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:
        for cells in [header, *rows]:
            print("\t".join(cells))
        return
    table = Table(title=title)
    for i, name in enumerate(header):
        table.add_column(name, justify="left" if i == 0 else "right")
    for cells in rows:
        table.add_row(*cells)
    console.print(table)


def _plot_by_length(report, path: Path) -> None:
    """One panel per metric: score against source-length bucket, a line per system."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ConfigError("--plot needs matplotlib: pip install 'rnmt[plot]'") from None
    keys = list(report.scores)
    figure = Figure(figsize=(5 * len(keys), 4), layout="constrained")
    axes = figure.subplots(1, len(keys), squeeze=False)[0]
    labels = [f"{b.label}\n({len(b.indices)})" for b in report.buckets]
    for ax, key in zip(axes, keys):
        for name, row in zip(report.systems, report.scores[key]):
            ax.plot(range(len(labels)), [math.nan if v is None else v for v in row],
                    marker="o", label=name)
        ax.set_xticks(range(len(labels)), labels)
        ax.set_xlabel("source length in words (sentences)")
        ax.set_ylabel(report.names[key])
        ax.grid(alpha=0.3)
        ax.legend()
    try:
        # The format named: matplotlib would append ".png" to a name without a suffix.
        figure.savefig(path, format=path.suffix[1:].lower() or "png")
    except (OSError, ValueError) as err:
        raise ConfigError(f"--plot {path}: cannot write the image ({err})") from None


# ---------------------------------------------------------------------------------------
# Model scores
# ---------------------------------------------------------------------------------------


def _model_scores(models: list[Path], files: list[Path], ref: list[Path], src: Path | None,
                  batch_size: int, device: str, errors: str, json_output: bool) -> None:
    from rnmt.text import decode_lines, read_lines
    from rnmt.evaluation import check_streams
    from rnmt.scoring import ForcedScorer, perplexity

    if len(models) != 1:
        raise ConfigError("forced decoding scores with one model (-m); several only with "
                          "--nbest-rescore")
    if len(files) + len(ref) > 1:
        raise ConfigError("give one target text to score: a file, one --ref, or stdin")
    scorer = ForcedScorer.load(models[0], device, batch_size)
    if files or ref:
        target_path = (files or ref)[0]
        name, targets = str(target_path), read_lines(target_path, errors).lines
    else:
        name = "<stdin>"
        targets = decode_lines(sys.stdin.buffer.read(), name, errors).lines
    sources = None
    if not scorer.is_language_model:
        if src is None:
            raise ConfigError(f"{models[0]} is a translation model: give the source with --src")
        sources = read_lines(src, errors).lines
        check_streams(targets, [sources], name, [str(src)])
    elif src is not None:  # silently dropping the source would pass off p(y) as p(y | x)
        raise ConfigError(f"{models[0]} is a language model: it scores target text alone, "
                          f"p(y), and reads no source; drop --src {src}")
    elif not targets:
        raise ConfigError(f"{name}: no lines to score (empty input)")
    scores = scorer.score_lines(targets, sources)
    ppl = perplexity(scores)
    tokens = sum(s.tokens for s in scores)
    if json_output:
        print(json.dumps({
            "model": str(models[0]), "sentences": len(scores), "tokens": tokens,
            "log_prob": round(sum(s.log_prob for s in scores), 4),
            "perplexity": round(ppl, 4),
            "lines": [{"log_prob": round(s.log_prob, 4), "tokens": s.tokens,
                       "per_token": round(s.per_token, 4)} for s in scores],
        }))
        return
    # One line per input line on stdout (log-prob, per-piece log-prob, pieces incl. </s>),
    # so the scores paste next to the text; the corpus figure goes to stderr.
    for s in scores:
        print(f"{s.log_prob:.4f}\t{s.per_token:.4f}\t{s.tokens}")
    print(f"perplexity {ppl:.4f} over {tokens} pieces of {len(scores)} sentences "
          f"({models[0]})", file=sys.stderr)


def _rescore(models: list[Path], nbest: Path, src: Path | None, weight: float, combine: str,
             batch_size: int, device: str, errors: str, json_output: bool) -> None:
    from rnmt.text import read_lines
    from rnmt.scoring import ForcedScorer, read_nbest, rescore_nbest

    candidates = read_nbest(nbest)
    scorers = [ForcedScorer.load(path, device, batch_size) for path in models]
    sources = read_lines(src, errors).lines if src is not None else None
    if sources is None and not all(s.is_language_model for s in scorers):
        raise ConfigError("re-ranking with a translation model needs the source (--src)")
    best = rescore_nbest(candidates, scorers, sources, combine, weight)
    if json_output:
        print(json.dumps([
            None if c is None else {"index": c.index, "text": c.text,
                                    "score": round(float(c.total), 4),  # type: ignore[arg-type]
                                    "original": c.score,
                                    "models": [round(v, 4) for v in c.model_scores or []]}
            for c in best
        ]))
        return
    for c in best:
        print("" if c is None else c.text)
