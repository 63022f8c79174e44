"""Translation speed: sentences/s and target pieces/s, decode-only and whole process.

    python benchmarks/translate_speed.py CHECKPOINT SOURCE REFERENCE [--runs 3] [--threads 2]

For each setting (greedy, beam 5) it measures, as medians over `--runs` runs:
  decode-only    Translator.translate over all lines, model already loaded (spm encode,
                 search, spm decode included; imports and checkpoint load excluded);
  whole process  `rnmt translate` as a user runs it (`< SOURCE > out`): interpreter start,
                 imports, checkpoint load and translation; with the child's peak RSS.
and the BLEU of the output (sacreBLEU, default 13a tokenisation) against REFERENCE.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = {"greedy": ["--beam", "1"], "beam5": ["--beam", "5"]}


def decode_only(checkpoint: Path, lines: list[str], beam: int, batch_size: int, runs: int
                ) -> tuple[float, int, list[str]]:
    """Median seconds, target pieces (</s> included) and the outputs."""
    from rnmt.search import SearchConfig
    from rnmt.translator import Translator

    translator = Translator.load(checkpoint, SearchConfig(beam=beam), device="cpu",
                                 batch_size=batch_size, buffer_size=len(lines) or 1)
    times, outputs, pieces = [], [], 0
    for _ in range(runs):
        start = time.perf_counter()
        best = [t[0] for t in translator.nbest(lines)]
        times.append(time.perf_counter() - start)
        outputs = [t.text for t in best]
        pieces = sum(len(t.pieces) + 1 for t in best)
    return statistics.median(times), pieces, outputs


def whole_process(checkpoint: Path, source: Path, args: list[str], threads: int,
                  batch_size: int, runs: int) -> tuple[float, float]:
    """Median wall seconds and the largest peak RSS (MB) of `rnmt translate` runs."""
    rnmt = [sys.executable, "-m", "rnmt_cli.main"]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    times, peak = [], 0.0
    for _ in range(runs):
        with open(source, "rb") as stdin, tempfile.TemporaryFile() as out:
            start = time.perf_counter()
            proc = subprocess.Popen(
                rnmt + ["translate", "-m", str(checkpoint), *args, "--batch-size",
                        str(batch_size), "--threads", str(threads), "--device", "cpu"],
                stdin=stdin, stdout=out, env=env)
            _, status, usage = os.wait4(proc.pid, 0)
            times.append(time.perf_counter() - start)
            proc.returncode = os.waitstatus_to_exitcode(status)
            if proc.returncode != 0:
                raise SystemExit(f"rnmt translate failed with exit code {proc.returncode}")
            peak = max(peak, usage.ru_maxrss / 1024)  # Linux reports KiB
    return statistics.median(times), peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="rnmt checkpoint (.pt)")
    parser.add_argument("source", type=Path, help="source text, one sentence per line")
    parser.add_argument("reference", type=Path, help="reference translations, line by line")
    parser.add_argument("--runs", type=int, default=3, help="runs per measurement (median)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for torch")
    parser.add_argument("--batch-size", type=int, default=64, help="sentences per batch")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS),
                        help="which settings to measure")
    args = parser.parse_args()

    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import sacrebleu
    import torch

    torch.set_num_threads(args.threads)
    lines = args.source.read_text("utf-8").splitlines()
    refs = args.reference.read_text("utf-8").splitlines()
    print(f"{len(lines)} sentences, {args.threads} threads, batch {args.batch_size}, "
          f"median of {args.runs} runs, torch {torch.__version__}", file=sys.stderr)
    rows = []
    for name in args.settings:
        beam = int(SETTINGS[name][1])
        seconds, pieces, outputs = decode_only(args.checkpoint, lines, beam, args.batch_size,
                                               args.runs)
        whole, peak = whole_process(args.checkpoint, args.source, SETTINGS[name], args.threads,
                                    args.batch_size, args.runs)
        bleu = sacrebleu.corpus_bleu(outputs, [refs]).score
        rows.append((name, len(lines) / seconds, pieces / seconds, len(lines) / whole,
                     pieces / whole, peak, bleu))
    print("| setting | decode-only sent/s | decode-only tok/s | whole-process sent/s "
          "| whole-process tok/s | peak RSS MB | BLEU |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, s, t, ws, wt, peak, bleu in rows:
        print(f"| {name} | {s:.1f} | {t:.0f} | {ws:.1f} | {wt:.0f} | {peak:.0f} | {bleu:.2f} |")


if __name__ == "__main__":
    main()
