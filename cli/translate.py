"""`rnmt translate`: stdin to stdout (or --input/--output), one line in, one line out."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Annotated, Optional

import typer


def translate(
    model: Annotated[list[Path], typer.Option("--model", "-m", help="Checkpoint to translate with; repeat for an ensemble (log-probabilities averaged).")],
    beam: Annotated[int, typer.Option(help="Beam size; 1 = greedy search.")] = 5,
    length_penalty: Annotated[float, typer.Option(help="GNMT length penalty α; 0 ranks by raw log-probability.")] = 1.0,
    max_len_a: Annotated[float, typer.Option(help="Output length limit: a * source length + b.")] = 1.5,
    max_len_b: Annotated[int, typer.Option(help="Output length limit: a * source length + b.")] = 10,
    max_len: Annotated[int, typer.Option(help="Hard output length limit in pieces, whatever a and b say.")] = 1024,
    min_len: Annotated[int, typer.Option(help="At least this many pieces before </s>.")] = 0,
    nbest: Annotated[int, typer.Option(help="Output the K best per line as index<TAB>score<TAB>text (K <= beam).")] = 1,
    no_repeat_ngram: Annotated[int, typer.Option(help="Never repeat an n-gram of pieces of this size in one output; 0 = off.")] = 0,
    unk_penalty: Annotated[float, typer.Option(help="Subtracted from the log-probability of <unk>.")] = 0.0,
    sample: Annotated[bool, typer.Option("--sample", help="Sample outputs instead of searching (back-translation, language models).")] = False,
    temperature: Annotated[float, typer.Option(help="Sampling temperature (>0); below 1 sharpens.")] = 1.0,
    top_k: Annotated[int, typer.Option(help="Sample among the k most probable pieces; 0 = all.")] = 0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling: the smallest set of pieces holding this probability.")] = 1.0,
    seed: Annotated[Optional[int], typer.Option(help="Random seed for --sample (repeatable draws).")] = None,
    alignment: Annotated[bool, typer.Option("--alignment", help="Append <TAB> and Pharaoh src-tgt word pairs from the attention.")] = False,
    output_format: Annotated[str, typer.Option(help="text, or json (translation, score, pieces, attention per line).")] = "text",
    attention_plot: Annotated[Optional[Path], typer.Option(help="Write one PNG attention heatmap per sentence into this directory (needs matplotlib).")] = None,
    input: Annotated[Optional[Path], typer.Option("--input", "-i", help="Read this file instead of stdin.")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write this file instead of stdout.")] = None,
    buffer_size: Annotated[int, typer.Option(help="Lines read, translated and written at a time.")] = 2000,
    interactive: Annotated[bool, typer.Option("--interactive", help="Answer each line at once (the default when stdin is a terminal).")] = False,
    errors: Annotated[str, typer.Option(help="Invalid UTF-8 input: replace (U+FFFD, counted) or strict (stop).")] = "replace",
    batch_size: Annotated[int, typer.Option(help="Sentences per batch (sorted by length).")] = 64,
    max_tokens: Annotated[int, typer.Option(help="At most this many source pieces (padding included) per batch, so very long lines get small batches and memory stays bounded; a longer line goes alone.")] = 16000,
    device: Annotated[str, typer.Option(help="auto (CUDA if present), cpu or cuda.")] = "auto",
    precision: Annotated[str, typer.Option(help="fp32, bf16 or fp16: the model's numbers (log-probabilities stay fp32). On a GPU bf16/fp16 are the fast path; on a CPU bf16 pays only with AMX/AVX512-BF16 and fp16 is refused.")] = "fp32",
    quantize: Annotated[str, typer.Option(help="none, or int8: int8 weights for the decoder's per-step layers (RNN, attention query, output layer, vocabulary projection); CPU only (--device auto picks the CPU for it), the fast CPU path.")] = "none",
    threads: Annotated[int, typer.Option(help="CPU threads; 0 = torch's default.")] = 0,
    workers: Annotated[int, typer.Option(help="CPU: search this many batches at once, each on threads/workers threads (2 on 2 cores: ~1.1x beam 5, ~1.2x int8; the same search, more memory).")] = 1,
) -> None:
    """Translate stdin to stdout, one line in, one line out."""
    # Before MKL's first call: MKL's own allocator keeps its buffers between calls, which
    # translation's few small fp32 products do not need. Peak RSS, beam 5 over Multi30k
    # test_2016 (AMX Xeon, whole process, 3 runs each): 395-401 against 404-410 MB with
    # --workers 2, bf16 403-406 against 409-419, int8 389-391 against 393-404; wall the same.
    os.environ.setdefault("MKL_DISABLE_FAST_MM", "1")
    import torch

    from rnmt.device import check_threads
    from rnmt.errors import ConfigError, DataError
    from rnmt.search import SearchConfig
    from rnmt.text import LineReader, TextLines, check_error_policy, same_file
    from rnmt.translator import OUTPUT_FORMATS, Translator

    check_threads(threads)
    if threads:
        torch.set_num_threads(threads)
    if (input is None and sys.stdin is None) or (output is None and sys.stdout is None):
        # `rnmt translate <&-`: Python gives a closed standard stream as None
        raise DataError("stdin or stdout is closed; give --input/--output files")
    if output_format not in OUTPUT_FORMATS:
        raise ConfigError(f"unknown --output-format {output_format!r}; choose from "
                          f"{', '.join(OUTPUT_FORMATS)}")
    check_error_policy(errors)
    for name, value in (("batch-size", batch_size), ("buffer-size", buffer_size),
                        ("max-tokens", max_tokens)):
        if value < 1:
            raise ConfigError(f"--{name} must be at least 1")
    if attention_plot is not None:
        from rnmt.plotting import require_matplotlib

        require_matplotlib()
        if attention_plot.exists() and not attention_plot.is_dir():
            # found before translating, not at the first plot ("cannot write output")
            raise ConfigError(f"--attention-plot {attention_plot}: exists and is not a "
                              "directory")
    config = SearchConfig(
        beam=beam, length_penalty=length_penalty, max_len_a=max_len_a, max_len_b=max_len_b,
        max_len=max_len,
        min_len=min_len, nbest=nbest, no_repeat_ngram=no_repeat_ngram, unk_penalty=unk_penalty,
        sample=sample, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
        attention=alignment or output_format == "json" or attention_plot is not None,
    )
    if input is not None and output is not None and same_file(input, output):
        # checked before -o is opened: opening it for writing would empty the input
        raise DataError(f"{input}: input and output are the same file")
    if input is not None:
        _open(input, "rb").close()  # a missing or unreadable file fails before the model loads
    if interactive or (input is None and sys.stdin.isatty()):
        buffer_size = 1
    translator = Translator.load(model, config, device=device, batch_size=batch_size,
                                 buffer_size=buffer_size, max_tokens=max_tokens,
                                 precision=precision, quantize=quantize, workers=workers)
    if (alignment or attention_plot is not None) and not translator.attends:
        # Without attention weights these would be empty: refused, not left blank in silence.
        option = "--alignment" if alignment else "--attention-plot"
        raise ConfigError(f"{option} needs a model with attention; {model[0]} has none "
                          "(an --arch seq2seq model or a language model)")
    for warning in translator.warnings:
        print(f"rnmt: warning: {warning}", file=sys.stderr)
    # A file, plain or .gz, streams through TextLines (which names the file when reading
    # fails midway); stdin through a LineReader, its read errors named by _stdin_lines.
    reader = (LineReader(sys.stdin.buffer, "<stdin>", errors) if input is None
              else TextLines(input, errors))
    lines = _stdin_lines(reader) if input is None else reader
    sink = sys.stdout if output is None else _open(output, "w")
    try:
        _write_translations(translator.translate_chunks(lines), sink, output_format, nbest,
                            alignment, attention_plot)
    except OSError as err:  # ENOSPC (`> /dev/full`), EIO, a quota: the output is incomplete
        if isinstance(err, BrokenPipeError):
            raise  # the reader left: main.guarded exits quietly with 0
        if sink is sys.stdout:
            # what is still buffered would fail again when Python flushes stdout at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        where = "output" if output is None else output
        raise DataError(f"cannot write {where}: {err.strerror or err}") from None
    if sink is not sys.stdout:
        sink.close()
    if reader.invalid_lines:
        print(f"rnmt: warning: {reader.invalid_lines} input lines had invalid UTF-8, "
              "replaced by U+FFFD", file=sys.stderr)


def _stdin_lines(reader: Iterable[str]) -> Iterator[str]:
    """stdin's lines; a read error is a DataError naming stdin, not an OSError that the
    writing loop would report as a write error."""
    from rnmt.text import read_error

    try:
        yield from reader
    except OSError as err:
        raise read_error(Path("<stdin>"), err) from None


def _write_translations(chunks, sink, output_format: str, nbest: int, alignment: bool,
                        attention_plot: Optional[Path]) -> None:
    """Each chunk's translations to `sink`, flushed a chunk at a time."""
    from rnmt.translator import format_translations

    index = 0
    for chunk in chunks:
        for translations in chunk:
            for line in format_translations(index, translations, output_format,
                                            nbest=nbest > 1, alignment=alignment):
                sink.write(line + "\n")
            if attention_plot is not None and translations[0].attention is not None:
                from rnmt.plotting import plot_attention

                best = translations[0]
                plot_attention(attention_plot / f"{index}.png", best.source_pieces + ["</s>"],
                               best.pieces + ["</s>"], best.attention)
            index += 1
        sink.flush()  # a chunk at a time: output starts before the input ends


def _open(path: Path, mode: str):
    from rnmt.errors import DataError

    try:
        return open(path, mode, encoding=None if "b" in mode else "utf-8")
    except OSError as err:
        raise DataError(f"{path}: cannot open ({err.strerror or err})") from None
