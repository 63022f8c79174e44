"""A training run's save directory: which files are the run's, the guard that keeps a new
run from replacing another's, the options `--resume` continues with, and the logs a run
writes there (`metrics.jsonl`, TensorBoard events, the `training.png` curves).

The checkpoints themselves (atomic writes, safe loading) are `rnmt.checkpoint`'s.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

from rnmt.checkpoint import load_checkpoint
from rnmt.errors import CheckpointError, ConfigError

# What a run writes into its save directory: `--overwrite` removes these before a new run
# starts there, so that no file of the old run (a step checkpoint that --keep-last would
# then count as newer, a metrics line) passes for one of the new run.
RUN_FILES = ("last.pt", "best.pt", "metrics.jsonl", "training.png")
STEP_CHECKPOINT = re.compile(r"checkpoint_(\d+)\.pt")


def run_checkpoints(save_dir: Path) -> list[Path]:
    """The checkpoints of an earlier run in `save_dir` (none if it is not a directory)."""
    if not save_dir.is_dir():
        return []
    return sorted(p for p in save_dir.iterdir()
                  if p.name in ("last.pt", "best.pt") or STEP_CHECKPOINT.fullmatch(p.name))


def check_save_dir(save_dir: Path, resume: bool, overwrite: bool) -> None:
    """A new run never silently replaces another's checkpoints (fairseq and OpenNMT-py do
    not either): an existing run must be continued with --resume or, explicitly, replaced
    with --overwrite. A save directory that is a file is refused here, before any work."""
    if save_dir.exists() and not save_dir.is_dir():
        raise ConfigError(f"--save-dir {save_dir}: exists and is not a directory")
    if resume or overwrite:
        return
    found = run_checkpoints(save_dir)
    if found:
        names = ", ".join(p.name for p in found[:3]) + (", ..." if len(found) > 3 else "")
        raise ConfigError(
            f"--save-dir {save_dir} already holds a run's checkpoints ({names}); continue "
            "it with --resume, start over with --overwrite (deletes them), or choose "
            "another --save-dir")


def saved_run_options(save_dir: Path) -> tuple[Path, dict[str, Any]]:
    """The resolved options of the run whose `last.pt` is in `save_dir` (what `--resume`
    continues), and the file they were read from. Missing or damaged: CheckpointError."""
    path = save_dir / "last.pt"
    if not path.exists():
        raise CheckpointError(f"--resume: {path} does not exist")
    options = load_checkpoint(path, mmap=True).get("train_config")  # no tensor is read
    if not isinstance(options, dict):
        raise CheckpointError(f"{path}: holds no training options to resume with")
    return path, options


def clear_run(save_dir: Path) -> None:
    """Delete the files of an earlier run in `save_dir` (--overwrite), nothing else."""
    for path in run_checkpoints(save_dir) + [save_dir / name for name in RUN_FILES]:
        path.unlink(missing_ok=True)
    shutil.rmtree(save_dir / "tensorboard", ignore_errors=True)


@contextlib.contextmanager
def run_lock(save_dir: Path) -> Iterator[None]:
    """Hold `save_dir/.lock` (an advisory flock, released when the process ends, however it
    ends) while a run trains there. A second `rnmt train` into the same directory would
    write over the first one's checkpoints (or, with --overwrite, delete them): refused.
    The directory is created here, on every platform."""
    try:
        save_dir.mkdir(parents=True, exist_ok=True)
        lock = open(save_dir / ".lock", "a+", encoding="utf-8")
    except OSError as err:  # read-only, no permission, a file in the way, full disk
        raise ConfigError(f"--save-dir {save_dir}: cannot write ({err.strerror or err})") from None
    with lock:
        try:
            import fcntl
        except ImportError:  # not POSIX: runs are not guarded against each other
            yield
            return
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip()
            raise ConfigError(
                f"--save-dir {save_dir} is in use by another rnmt train"
                + (f" (pid {holder})" if holder.isdigit() else "")
                + "; wait for it to finish, or choose another --save-dir") from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        yield


class MetricsLog:
    """JSON lines in `save_dir/metrics.jsonl`; TensorBoard events too when installed.

    Logging never ends a run: a tensorboard that fails to load, or a log file that can no
    longer be written (a full disk), is one call of `warn`, and the run goes on (its
    checkpoints report for themselves whether they can still be written)."""

    def __init__(self, save_dir: Path, append: bool = True,
                 warn: Callable[[str], None] = lambda message: None) -> None:
        """`append`: a resumed run adds to its log; a new run starts the file afresh."""
        self.path = save_dir / "metrics.jsonl"
        self.file: TextIO | None = open(self.path, "a" if append else "w", encoding="utf-8")
        self.failed = False  # the file could not be written: it may end in a torn line
        self.warn = warn
        self.tensorboard = None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional
            return
        except Exception as err:  # noqa: BLE001 - e.g. a protobuf release it was not built for
            first_line = (str(err).splitlines() or [""])[0]  # protobuf's messages run to many lines
            warn(f"tensorboard is installed but failed to load ({type(err).__name__}: "
                 f"{first_line}); no TensorBoard events are written")
            return
        self.tensorboard = SummaryWriter(str(save_dir / "tensorboard"))

    def write(self, kind: str, stats: dict[str, Any]) -> None:
        record = {"kind": kind, **{k: v for k, v in stats.items()
                                   if isinstance(v, (int, float, str, bool))}}
        if self.file is not None:
            try:
                self.file.write(json.dumps(record) + "\n")
                self.file.flush()
            except OSError as err:
                self._give_up(err)
        if self.tensorboard is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.tensorboard.add_scalar(f"{kind}/{key}", value, stats["step"])

    def _give_up(self, err: OSError) -> None:
        self.failed = True
        with contextlib.suppress(OSError):  # what is still buffered fails again
            self.file.close()
        self.file = None
        self.warn(f"cannot write {self.path} ({err.strerror or err}); no more metrics are "
                  "logged there, training goes on")

    def close(self) -> None:
        if self.file is not None:
            try:
                self.file.close()
            except OSError as err:
                self._give_up(err)
        if self.tensorboard is not None:
            self.tensorboard.close()


def plot_curves(metrics_path: Path, out: Path) -> bool:
    """Training and validation loss against updates, as a PNG; False without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in metrics_path.read_text("utf-8").splitlines()]
    train = [(r["step"], r["loss"]) for r in records if r["kind"] == "train"]
    valid = [(r["step"], r["valid_loss"]) for r in records if r["kind"] == "valid"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for points, label in ((train, "train"), (valid, "valid")):
        if points:
            ax.plot(*zip(*points), marker="." if label == "valid" else None, label=label)
    ax.set_xlabel("update")
    ax.set_ylabel("loss (NLL per target piece)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return True
