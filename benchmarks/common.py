"""What the benchmark scripts share: the machine they ran on, and a child process's wall
time and peak memory.

The scripts run as `python benchmarks/NAME.py`, which puts this folder on `sys.path`, so
they import it as `from common import ...`.
"""

from __future__ import annotations

import os
import platform
import subprocess
import time
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
    peak_rss_mb: float  # the kernel's peak resident set (ru_maxrss) of the child


def run_child(command: list[str], threads: int, stdin: IO | None = None,
              stdout: IO | int | None = None, stderr: IO | int | None = None,
              extra_env: dict[str, str] | None = None,
              sample: Callable[[int], None] | None = None) -> Finished:
    """Run `command` with `threads` OpenMP/MKL threads and wait for it with `os.wait4`,
    which returns the child's own resource usage (a parent's `getrusage(RUSAGE_CHILDREN)`
    would mix all its children). `sample(pid)`, if given, is called every 50 ms while the
    child runs (for what only /proc shows, e.g. private against file-backed memory)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               **(extra_env or {}))
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdin=stdin, stdout=stdout, stderr=stderr, env=env)
    if sample is None:
        _, status, usage = os.wait4(proc.pid, 0)
    else:
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            sample(proc.pid)
            time.sleep(0.05)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped: Popen must not wait again
    return Finished(seconds, proc.returncode, usage.ru_maxrss / 1024)  # Linux reports KiB
