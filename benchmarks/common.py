"""What the benchmark scripts share: the machine they ran on, and a child process's wall
time and peak memory.

The scripts run as `python benchmarks/NAME.py`, which puts this folder on `sys.path`, so
they import it as `from common import ...`.
"""

from __future__ import annotations

import os
import platform
import select
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo, else the platform's processor or machine."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@dataclass
class Finished:
    """A child process run to its end."""

    seconds: float  # wall time, start to exit
    exit_code: int
    peak_rss_mb: float  # the kernel's peak resident set (ru_maxrss) of the command alone


# Linux starts a process's ru_maxrss from the peak RSS of the memory image it exec'd from,
# and Python spawns by vfork, so a command spawned directly would report at least the
# *parent's* peak (a benchmark that loaded models or generated a corpus in-process: a child
# was measured at 480 MB beside 409 MB for the same work, from the parent's growth alone).
# This launcher, a fresh interpreter of ~10 MB, forks the command and reports the command's
# own usage: its pid first (for sampling /proc), then its exit code, peak RSS (KiB) and
# wall seconds from fork to exit (so the launcher's own start-up is not counted).
LAUNCHER = """
import os, signal, sys, time
out = int(sys.argv[1])
start = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.close(out)
    for name in ("SIGPIPE", "SIGXFSZ"):  # ignored by Python, not by the command
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_DFL)
    try:
        os.execvp(sys.argv[2], sys.argv[2:])
    except OSError as err:
        os.write(2, f"{sys.argv[2]}: {err}\\n".encode())
    os._exit(127)
os.write(out, f"{pid}\\n".encode())
_, status, usage = os.wait4(pid, 0)
seconds = time.perf_counter() - start
os.write(out, f"{os.waitstatus_to_exitcode(status)} {usage.ru_maxrss} {seconds!r}\\n".encode())
"""


def run_child(command: list[str], threads: int, stdin: IO | None = None,
              stdout: IO | int | None = None, stderr: IO | int | None = None,
              extra_env: dict[str, str] | None = None,
              sample: Callable[[int], None] | None = None) -> Finished:
    """Run `command` with `threads` OpenMP/MKL threads to its end: wall seconds, exit code
    and the command's own peak RSS (through `LAUNCHER`, see there). stdin/stdout/stderr:
    files, DEVNULL or None (inherited); not PIPE, which nothing here would read.
    `sample(pid)`, if given, is called with the command's pid every 50 ms while it runs
    (for what only /proc shows, e.g. private against file-backed memory)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           **(extra_env or {})}
    read, write = os.pipe()
    try:
        launcher = subprocess.Popen([sys.executable, "-S", "-c", LAUNCHER, str(write),
                                     *command], stdin=stdin, stdout=stdout, stderr=stderr,
                                    env=env, pass_fds=(write,))
    finally:
        os.close(write)
    with os.fdopen(read) as report:
        first = report.readline()
        if first and sample is not None:
            pid = int(first)
            while not select.select([report], [], [], 0.05)[0]:  # until the exit report
                sample(pid)
        last = report.readline().split()
    launcher.wait()
    if not first or len(last) != 3:
        raise RuntimeError(f"{command[0]}: the launcher ended without its report "
                           f"(exit {launcher.returncode})")
    return Finished(float(last[2]), int(last[0]), int(last[1]) / 1024)  # Linux reports KiB
