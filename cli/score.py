"""`rnmt score`: sacreBLEU BLEU and chrF of a system output against references."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from rnmt.data import decode_lines, read_lines
from rnmt.errors import DataError


def score(
    hypothesis: Annotated[
        Optional[Path], typer.Argument(help="System output; stdin when omitted.")
    ] = None,
    ref: Annotated[
        list[Path], typer.Option("--ref", "-r", help="Reference file; repeat for several.")
    ] = ...,  # type: ignore[assignment]
    json_output: Annotated[
        bool, typer.Option("--json", help="Print machine-readable JSON.")
    ] = False,
) -> None:
    """Print BLEU and chrF (sacrebleu, 13a, cased) with their signatures."""
    from rnmt.evaluation import corpus_scores

    if hypothesis is None:
        hyps = decode_lines(sys.stdin.buffer.read(), "<stdin>").lines
    else:
        hyps = read_lines(hypothesis).lines
    if not hyps:
        raise DataError(f"{hypothesis or '<stdin>'}: no hypotheses (empty input)")
    refs = []
    for path in ref:
        lines = read_lines(path).lines
        if len(lines) != len(hyps):
            raise DataError(
                f"line counts differ: {hypothesis or '<stdin>'} has {len(hyps)} lines, "
                f"{path} has {len(lines)}"
            )
        refs.append(lines)
    results = corpus_scores(hyps, refs)
    if json_output:
        print(json.dumps({r.key: {"name": r.name, "score": round(r.score, 4), "signature": r.signature}
                          for r in results}))
    else:
        for r in results:
            print(f"{r.text}\t{r.signature}")
