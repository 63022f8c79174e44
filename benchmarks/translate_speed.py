"""Translation speed: sentences/s and target pieces/s, decode-only and whole process, with
BLEU and peak memory, for fp32, int8 and bf16 search.

    python benchmarks/translate_speed.py CHECKPOINT SOURCE REFERENCE [--runs 3] [--threads 2]
        [--variants greedy beam5 beam5-int8 beam5-bf16] [--device cpu]

e.g. the Multi30k reference model on test_2016_flickr (benchmarks/multi30k_reference.sh):

    python benchmarks/translate_speed.py work/m30k/run/best.pt \\
        work/m30k/spm/raw/test.de work/m30k/spm/raw/test.en --runs 3

For each variant, as medians over `--runs` runs, the runs of all variants interleaved (so a
busy machine slows every variant alike):
  decode-only    `Translator.nbest` over all lines, model already loaded (spm encode, search,
                 spm decode included; imports and checkpoint load excluded);
  whole process  `rnmt translate < SOURCE > out` as a user runs it: interpreter start,
                 imports, checkpoint load (and weight packing) and translation, with the
                 peak RSS of the child (the largest over the runs); not for the `-unpacked`
                 variants (fp32 on torch's own kernels, which the command line never uses);
  start-up       the whole process on a one-line input;
and the BLEU of the output (sacreBLEU, 13a, cased) against REFERENCE. The whole-process
output must equal the decode-only output; a difference is reported on stderr.
`--decode-only` measures decode-only alone (benchmarks/peers.sh times the whole process
itself, beside the peers).
Target pieces count `</s>`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import NamedTuple
from pathlib import Path

from common import cpu_name, run_child

class Variant(NamedTuple):
    beam: int
    precision: str = "fp32"
    quantize: str = "none"
    workers: int = 1  # 2: two batches searched at once, one thread each (--threads 2)
    pack: bool = True  # False: fp32 on torch's own kernels, not rnmt.step_layers' oneDNN;
    # decode-only, since the command line always packs


VARIANTS: dict[str, Variant] = {
    "greedy": Variant(1),
    "beam5": Variant(5),
    "beam5-int8": Variant(5, quantize="int8"),
    "beam5-bf16": Variant(5, "bf16"),
    "greedy-int8": Variant(1, quantize="int8"),
    "greedy-bf16": Variant(1, "bf16"),
    "beam5-fp16": Variant(5, "fp16"),
    "greedy-fp16": Variant(1, "fp16"),
    "greedy-w2": Variant(1, workers=2),
    "beam5-w2": Variant(5, workers=2),
    "beam5-int8-w2": Variant(5, quantize="int8", workers=2),
    "beam5-bf16-w2": Variant(5, "bf16", workers=2),
    "greedy-unpacked": Variant(1, pack=False),
    "beam5-unpacked": Variant(5, pack=False),
}
DEFAULT_VARIANTS = ["greedy", "beam5", "beam5-int8", "beam5-bf16"]


@dataclass
class Measured:
    decode: list[float] = field(default_factory=list)
    whole: list[float] = field(default_factory=list)
    startup: list[float] = field(default_factory=list)
    peak_mb: float = 0.0
    pieces: int = 0
    outputs: list[str] = field(default_factory=list)


def cli_args(v: Variant, args: argparse.Namespace) -> list[str]:
    return ["--beam", str(v.beam), "--precision", v.precision, "--quantize", v.quantize,
            "--workers", str(v.workers),
            "--batch-size", str(args.batch_size), "--threads", str(args.threads),
            "--device", args.device]


def run_cli(checkpoint: Path, source: Path, options: list[str], threads: int
            ) -> tuple[float, float, list[str]]:
    """One `rnmt translate` process: wall seconds, peak RSS (MB) and its output lines."""
    command = [sys.executable, "-m", "rnmt_cli.main", "translate", "-m", str(checkpoint),
               *options]
    with open(source, "rb") as stdin, tempfile.TemporaryFile() as out:
        run = run_child(command, threads, stdin=stdin, stdout=out)
        if run.exit_code != 0:
            raise SystemExit(f"rnmt translate {' '.join(options)} failed")
        out.seek(0)
        lines = out.read().decode("utf-8").splitlines()
    return run.seconds, run.peak_rss_mb, lines


def machine() -> str:
    import torch

    return (f"{cpu_name()}, torch {torch.__version__}, CPU capability "
            f"{torch.backends.cpu.get_cpu_capability()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="rnmt checkpoint (.pt)")
    parser.add_argument("source", type=Path, help="source text, one sentence per line")
    parser.add_argument("reference", type=Path, help="reference translations, line by line")
    parser.add_argument("--runs", type=int, default=3, help="runs per measurement (median)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for torch")
    parser.add_argument("--batch-size", type=int, default=64, help="sentences per batch")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS,
                        choices=list(VARIANTS), help="what to measure")
    parser.add_argument("--decode-only", action="store_true",
                        help="skip the whole-process and start-up runs (benchmarks/peers.sh "
                             "times those itself)")
    args = parser.parse_args()

    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import sacrebleu
    import torch

    from rnmt.search import SearchConfig
    from rnmt.translator import Translator

    torch.set_num_threads(args.threads)
    lines = args.source.read_text("utf-8").splitlines()
    refs = args.reference.read_text("utf-8").splitlines()
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as one:
        one.write(lines[0] + "\n")
    print(f"{len(lines)} sentences, {args.threads} threads, batch {args.batch_size}, "
          f"median of {args.runs} runs; {machine()}", file=sys.stderr)

    translators = {}
    for name in args.variants:
        v = VARIANTS[name]
        translators[name] = Translator.load(args.checkpoint, SearchConfig(beam=v.beam),
                                            device=args.device, batch_size=args.batch_size,
                                            buffer_size=max(1, len(lines)),
                                            precision=v.precision, quantize=v.quantize,
                                            workers=v.workers, pack=v.pack)
    results = {name: Measured() for name in args.variants}
    cuda = args.device.startswith("cuda")
    for run in range(args.runs):
        for name, translator in translators.items():
            m = results[name]
            start = time.perf_counter()
            best = [t[0] for t in translator.nbest(lines)]
            if cuda:
                torch.cuda.synchronize()
            m.decode.append(time.perf_counter() - start)
            m.outputs = [t.text for t in best]
            m.pieces = sum(len(t.pieces) + 1 for t in best)
            line = f"run {run + 1}/{args.runs} {name}: decode {m.decode[-1]:.2f} s"
            # The command line always packs: unpacked variants are decode-only.
            if VARIANTS[name].pack and not args.decode_only:
                options = cli_args(VARIANTS[name], args)
                seconds, peak, cli_out = run_cli(args.checkpoint, args.source, options,
                                                 args.threads)
                m.whole.append(seconds)
                m.peak_mb = max(m.peak_mb, peak)
                if cli_out != m.outputs:
                    print(f"{name}: the CLI output differs from the decode-only output on "
                          f"{sum(a != b for a, b in zip(cli_out, m.outputs))} lines",
                          file=sys.stderr)
                m.startup.append(run_cli(args.checkpoint, Path(one.name), options,
                                         args.threads)[0])
                line += f", whole {seconds:.2f} s, start-up {m.startup[-1]:.2f} s"
            print(line, file=sys.stderr)
    os.unlink(one.name)

    base = results.get("beam5")
    print("| variant | decode-only sent/s | decode-only tok/s | whole-process sent/s "
          "| whole-process tok/s | start-up s (1 line) | peak RSS MB | BLEU |"
          + (" decode-only vs beam5 |" if base else ""))
    print("|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if base else ""))
    for name, m in results.items():
        decode = statistics.median(m.decode)
        bleu = sacrebleu.corpus_bleu(m.outputs, [refs]).score
        if m.whole:
            whole = statistics.median(m.whole)
            process = (f"{len(lines) / whole:.1f} | {m.pieces / whole:.0f} "
                       f"| {statistics.median(m.startup):.2f} | {m.peak_mb:.0f}")
        else:
            process = "– | – | – | –"
        row = (f"| {name} | {len(lines) / decode:.1f} | {m.pieces / decode:.0f} "
               f"| {process} | {bleu:.2f} |")
        if base:
            row += f" {statistics.median(base.decode) / decode:.2f}× |"
        print(row)


if __name__ == "__main__":
    main()
