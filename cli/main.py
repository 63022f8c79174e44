"""`rnmt` — the command-line entry point: registers the subcommands and maps errors to exit codes.

Exit codes: 0 success; 2 bad input, file or option (one line on stderr); 130 interrupted.
"""

from __future__ import annotations

import functools
import importlib
import os
import re
import sys
from collections.abc import Callable, Iterable
from typing import Any

import typer

from rnmt.errors import RnmtError, is_out_of_memory, option_flag

# name -> one-line summary; the function `name` of module `rnmt_cli.name` runs it.
COMMANDS = {
    "preprocess": "Learn sentencepiece vocabularies and binarise a corpus.",
    "train": "Train a model on a preprocessed corpus.",
    "translate": "Translate stdin to stdout, one line in, one line out.",
    "score": "Score translations (BLEU, chrF, TER) and models.",
    "average": "Average the parameters of several checkpoints into one.",
}


def guarded(command: Callable[..., Any]) -> Callable[..., Any]:
    """The one place where the core's exceptions become `rnmt: error: …` and an exit code."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except RnmtError as err:
            print(f"rnmt: error: {err}", file=sys.stderr)
            raise SystemExit(2) from None
        except (MemoryError, RuntimeError) as err:
            # Sizes past this machine's memory (`--beam 10**9`, `--emb-dim 10**9`): torch
            # reports a failed CPU allocation as a RuntimeError, Python as a MemoryError.
            if not is_out_of_memory(err):
                raise
            print(f"rnmt: error: {out_of_memory_message(err)}", file=sys.stderr)
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


def given_on_command_line(ctx: typer.Context, name: str) -> bool:
    """Whether the option `name` (its parameter name) was given, not left at its default."""
    source = ctx.get_parameter_source(name)
    return getattr(source, "name", "DEFAULT") not in ("DEFAULT", "DEFAULT_MAP")


def warn_unused(ctx: typer.Context, names: tuple[str, ...], why: str) -> None:
    """One warning line naming each of the options `names` (parameter names) that was given
    on the command line although the chosen mode ignores it: nothing is dropped in silence."""
    warn_not_used([option_flag(name) for name in names
                   if given_on_command_line(ctx, name)], why)


def warn_not_used(given: list[str], why: str) -> None:
    """`rnmt: warning: A, B not used: why` on stderr, when anything was given in vain."""
    if given:
        print(f"rnmt: warning: {', '.join(given)} not used: {why}", file=sys.stderr)


def out_of_memory_message(err: BaseException) -> str:
    """One line for a failed allocation: how much was asked for, when the message says."""
    asked = re.search(r"allocate (\d+) bytes", str(err))
    size = f" ({int(asked.group(1)) / 2**30:,.1f} GiB asked for)" if asked else ""
    return (f"out of memory{size}: the model, beam or batch asked for is too large for "
            "this machine")


def versions() -> str:
    """rnmt's version and those of the libraries whose behaviour its output depends on,
    read from the installed packages' metadata (importing torch would take a second)."""
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for package in ("rnmt", "torch", "sentencepiece", "sacrebleu"):
        try:
            found.append(f"{package} {version(package)}")
        except PackageNotFoundError:
            found.append(f"{package} (not installed)")
    return f"{found[0]} ({', '.join(found[1:])})"


def _print_version(asked: bool) -> None:
    if asked:
        print(versions())
        raise typer.Exit()


def _top_level(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="Print the versions of rnmt, torch, sentencepiece "
                                      "and sacrebleu, and exit."),
) -> None:
    """Neural machine translation with recurrent networks."""


def build_app(names: Iterable[str] = COMMANDS) -> typer.Typer:
    """The `rnmt` command with the subcommands `names` (their modules imported here)."""
    app = typer.Typer(
        name="rnmt",
        help="Neural machine translation with recurrent networks.",
        add_completion=False,
        no_args_is_help=True,
        pretty_exceptions_enable=False,
        context_settings={"help_option_names": ["-h", "--help"]},
    )
    # A callback keeps `rnmt NAME …` a group command when only one subcommand is built.
    app.callback()(_top_level)
    for name in names:
        function = getattr(importlib.import_module(f"rnmt_cli.{name}"), name)
        app.command(name=name, help=COMMANDS[name])(guarded(function))
    return app


def __getattr__(name: str) -> Any:
    """`from rnmt_cli.main import app`: the command with every subcommand."""
    if name == "app":
        return build_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main() -> None:
    # Build only the subcommand being run: users pay start-up on every pipeline call, and
    # `rnmt translate` has no use for the modules (rich, …) of preprocess and train.
    wanted = sys.argv[1] if len(sys.argv) > 1 and sys.argv[1] in COMMANDS else None
    build_app([wanted] if wanted else COMMANDS)()


if __name__ == "__main__":
    main()
