"""`rnmt average`: average the parameters of several checkpoints into one file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer


def average(
    checkpoints: Annotated[Optional[list[Path]], typer.Argument(help="Checkpoints to average (or use --last with --save-dir).")] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the averaged checkpoint.")] = Path("average.pt"),
    last: Annotated[int, typer.Option(help="Average the N checkpoints of --save-dir with the highest training steps.")] = 0,
    save_dir: Annotated[Optional[Path], typer.Option(help="Run directory that --last picks checkpoints from.")] = None,
) -> None:
    """Average checkpoints' parameters (fairseq's average_checkpoints)."""
    from rnmt.checkpoint import (average_checkpoints, check_average_output,
                                 latest_checkpoints, save_checkpoint)
    from rnmt.errors import ConfigError

    paths = list(checkpoints or [])
    if last < 0:
        raise ConfigError(f"--last {last}: must be at least 1 (0 = not used)")
    if last:
        if save_dir is None:
            raise ConfigError("--last needs --save-dir (the run to take checkpoints from)")
        paths += latest_checkpoints(save_dir, last)
    if not paths:
        raise ConfigError("give checkpoints, or --last N --save-dir DIR")
    check_average_output(paths, output)  # before averaging: refused without any work done
    save_checkpoint(average_checkpoints(paths), output)
    print(f"averaged {len(paths)} checkpoints into {output}")
