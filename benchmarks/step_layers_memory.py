"""Resident memory and time of the decoder's step layers when the row count keeps changing,
as it does in beam search: why `rnmt.nn.onednn.OneDNNLinear` pads rows to `row_bucket`.

    python benchmarks/step_layers_memory.py [--rows 320] [--sweeps 2] [--threads 2]

The reference model's four per-step products (x Wᵀ + b):
LSTM gates [E y; c; h] (1280 -> 2048), attention query (512 -> 512), deep output
(1280 -> 512) and vocabulary projection (512 -> 3964), each run at every row count from 1
to `--rows`, `--sweeps` times over, in a fresh process per kernel:

  addmm            torch's fp32 `addmm` (what `nn.Linear` runs; MKL)
  onednn           `OneDNNLinear` with its rows padded to `row_bucket`
  onednn-unpadded  the same products run at their own row counts

Prints, per kernel, the growth of the resident set over the sweeps (MB, after − before),
the number of distinct row counts the kernel ran at, and the median seconds of a sweep.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from common import cpu_name

SHAPES = [(1280, 2048), (512, 512), (1280, 512), (512, 3964)]  # (in, out)
KERNELS = ("addmm", "onednn", "onednn-unpadded")


def resident_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def child(kernel: str, rows: int, sweeps: int) -> dict:
    """One kernel's sweeps in this process: the JSON line the parent reads."""
    import torch

    from rnmt.nn import onednn

    torch.set_grad_enabled(False)
    torch.manual_seed(0)
    weights = [(torch.randn(n, k), torch.randn(n)) for k, n in SHAPES]
    if kernel == "addmm":
        layers = [lambda x, w=w, b=b: torch.addmm(b, x, w.t()) for w, b in weights]
    else:
        if kernel == "onednn-unpadded":
            onednn.row_bucket = lambda count: count  # run every count as it comes
        layers = [onednn.OneDNNLinear(w, b) for w, b in weights]
    inputs = {k: torch.randn(rows, k) for k, _ in SHAPES}
    before = resident_mb()
    seconds = []
    for _ in range(sweeps):
        start = time.perf_counter()
        for count in range(1, rows + 1):
            for (k, _), layer in zip(SHAPES, layers):
                layer(inputs[k][:count])
        seconds.append(time.perf_counter() - start)
    sizes = rows if kernel == "addmm" else len({onednn.row_bucket(c)
                                                 for c in range(1, rows + 1)})
    return {"growth_mb": resident_mb() - before, "seconds": statistics.median(seconds),
            "sizes": sizes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=320, help="largest row count (64 × beam 5)")
    parser.add_argument("--sweeps", type=int, default=2, help="sweeps over 1..rows")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--child", choices=KERNELS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(child(args.child, args.rows, args.sweeps)))
        return
    print(f"{cpu_name()}, {args.threads} threads, rows 1..{args.rows}, {args.sweeps} sweeps",
          file=sys.stderr)
    print("| kernel | distinct row counts run | resident growth MB | seconds per sweep |")
    print("|---|---:|---:|---:|")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    for kernel in KERNELS:
        command = [sys.executable, __file__, "--child", kernel, "--rows", str(args.rows),
                   "--sweeps", str(args.sweeps), "--threads", str(args.threads)]
        out = subprocess.run(command, env=env, check=True, capture_output=True, text=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"| {kernel} | {r['sizes']} | {r['growth_mb']:.0f} | {r['seconds']:.2f} |")


if __name__ == "__main__":
    main()
