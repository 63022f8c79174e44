"""`rnmt` — the command-line entry point: registers the subcommands and maps errors to exit codes.

Exit codes: 0 success; 2 bad input, file or option (one line on stderr); 130 interrupted.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any

import typer

from rnmt.errors import RnmtError
from rnmt_cli import average, preprocess, score, train, translate

app = typer.Typer(
    name="rnmt",
    help="Neural machine translation with recurrent networks.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def guarded(command: Callable[..., Any]) -> Callable[..., Any]:
    """The one place where the core's exceptions become `rnmt: error: …` and an exit code."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except RnmtError as err:
            print(f"rnmt: error: {err}", file=sys.stderr)
            raise SystemExit(2) from None
        except KeyboardInterrupt:
            print("rnmt: interrupted", file=sys.stderr)
            raise SystemExit(130) from None
        except BrokenPipeError:
            # `rnmt translate … | head`: the reader left. Exit quietly, and keep Python from
            # failing again when it flushes stdout at shutdown.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            raise SystemExit(0) from None

    return run


for name, function, summary in (
    ("preprocess", preprocess.preprocess, "Learn sentencepiece vocabularies and binarise a corpus."),
    ("train", train.train, "Train a model on a preprocessed corpus."),
    ("translate", translate.translate, "Translate stdin to stdout, one line in, one line out."),
    ("score", score.score, "Score translations (BLEU, chrF, TER) and models."),
    ("average", average.average, "Average the parameters of several checkpoints into one."),
):
    app.command(name=name, help=summary)(guarded(function))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
