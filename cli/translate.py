"""`rnmt translate`: stdin to stdout, one line in, one line out."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer


def translate(
    model: Annotated[Path, typer.Option("--model", "-m", help="Checkpoint to translate with.")],
    beam: Annotated[int, typer.Option(help="Beam size; 1 = greedy search.")] = 5,
    length_penalty: Annotated[float, typer.Option(help="GNMT length penalty α; 0 ranks by raw log-probability.")] = 1.0,
    max_len_a: Annotated[float, typer.Option(help="Output length limit: a * source length + b.")] = 1.5,
    max_len_b: Annotated[int, typer.Option(help="Output length limit: a * source length + b.")] = 10,
    batch_size: Annotated[int, typer.Option(help="Sentences per batch (sorted by length).")] = 64,
    device: Annotated[str, typer.Option(help="auto (CUDA if present), cpu or cuda.")] = "auto",
    threads: Annotated[int, typer.Option(help="CPU threads; 0 = torch's default.")] = 0,
) -> None:
    """Translate stdin to stdout, one line in, one line out."""
    import torch

    from rnmt.data import decode_lines
    from rnmt.search import SearchConfig
    from rnmt.translator import Translator

    if threads:
        torch.set_num_threads(threads)
    if beam < 1:
        raise typer.BadParameter("must be at least 1", param_hint="--beam")
    config = SearchConfig(beam=beam, length_penalty=length_penalty, max_len_a=max_len_a,
                          max_len_b=max_len_b)
    translator = Translator.load(model, config, device=device, batch_size=batch_size)
    lines = decode_lines(sys.stdin.buffer.read(), "<stdin>").lines
    for line in translator.translate_lines(lines):
        sys.stdout.write(line + "\n")
    sys.stdout.flush()
