"""`rnmt preprocess`: learn vocabularies and binarise a parallel (or, with --mono, a
monolingual) corpus."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table


def preprocess(
    ctx: typer.Context,
    train: Annotated[str, typer.Option(help="Training prefix: reads PREFIX.SRC and PREFIX.TGT (or .gz); with --mono PREFIX.LANG.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory.")],
    source_lang: Annotated[Optional[str], typer.Option("--source-lang", "-s", help="Source language code (file suffix).")] = None,
    target_lang: Annotated[Optional[str], typer.Option("--target-lang", "-t", help="Target language code (file suffix).")] = None,
    mono: Annotated[bool, typer.Option("--mono", help="Monolingual corpus of language --lang, for a language model (rnmt train --arch lm).")] = False,
    lang: Annotated[Optional[str], typer.Option("--lang", "-l", help="With --mono: the language code (file suffix).")] = None,
    valid: Annotated[Optional[str], typer.Option(help="Validation prefix.")] = None,
    test: Annotated[Optional[str], typer.Option(help="Test prefix.")] = None,
    vocab_size: Annotated[int, typer.Option(help="Sentencepiece vocabulary size (soft limit).")] = 8000,
    model_type: Annotated[str, typer.Option(help="Sentencepiece model: unigram or bpe.")] = "unigram",
    separate_vocab: Annotated[bool, typer.Option(help="Train one sentencepiece model per language instead of a joint one.")] = False,
    joined_dictionary: Annotated[bool, typer.Option(help="One vocabulary for both sides (needed to share embeddings).")] = False,
    spm_model: Annotated[Optional[Path], typer.Option(help="Reuse this sentencepiece model (any special ids) instead of training one.")] = None,
    vocab_from: Annotated[Optional[Path], typer.Option(help="Reuse the sentencepiece model and vocabularies of this earlier output directory (one id space: models trained on either ensemble).")] = None,
    max_len: Annotated[int, typer.Option(help="Drop training pairs with a side longer than this many pieces.")] = 250,
    errors: Annotated[str, typer.Option(help="Invalid UTF-8: replace (U+FFFD, counted) or strict (stop).")] = "replace",
    threads: Annotated[int, typer.Option(help="Threads for sentencepiece.")] = 2,
) -> None:
    """Learn sentencepiece vocabularies and binarise train/valid/test."""
    from rnmt.errors import ConfigError
    from rnmt.preprocess import PreprocessConfig
    from rnmt.preprocess import preprocess as run
    from rnmt_cli.main import warn_unused

    if mono:
        if lang is None or source_lang is not None or target_lang is not None:
            raise ConfigError("--mono takes one language: give -l/--lang, not -s/-t")
        source_lang = target_lang = lang
    elif lang is not None:
        raise ConfigError("-l/--lang is for --mono; a parallel corpus needs -s and -t")
    elif source_lang is None or target_lang is None:
        raise ConfigError("give the languages: -s SRC -t TGT (or --mono -l LANG)")
    # Options that shape a new sentencepiece model, when none is learnt.
    reused = ("--vocab-from's vocabularies are used as they are" if vocab_from is not None
              else "--spm-model is used as it is, for both languages" if spm_model is not None
              else None)
    if reused is not None:
        warn_unused(ctx, ("vocab_size", "model_type", "separate_vocab"), reused)
    report = run(PreprocessConfig(
        src_lang=source_lang, tgt_lang=target_lang, out=out, train=train, valid=valid,
        test=test, vocab_size=vocab_size, model_type=model_type, separate_vocab=separate_vocab,
        joined_dictionary=joined_dictionary, spm_model=spm_model, max_len=max_len,
        errors=errors, threads=threads, mono=mono, vocab_from=vocab_from,
    ))
    console = Console(stderr=True)
    table = Table(title=f"rnmt preprocess → {out}")
    for column in ("split", "lines" if mono else "pairs", "kept", "empty", f"> {max_len} pieces",
                   "invalid UTF-8 lines", "<unk> pieces"):
        table.add_column(column, justify="right")
    for s in report.splits:
        table.add_row(s.name, str(s.total), str(s.kept), str(s.empty), str(s.too_long),
                      str(s.invalid_utf8_lines), str(s.unknown_pieces))
    console.print(table)
    sizes = ", ".join(f"{lang} {n}" for lang, n in report.vocab_sizes.items())
    console.print(f"vocabulary sizes (with 4 specials): {sizes}")
