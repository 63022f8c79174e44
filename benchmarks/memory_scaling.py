"""Peak resident memory of `rnmt preprocess` and `rnmt train` as the corpus grows.

    python benchmarks/memory_scaling.py [--sizes 250000 1000000 4000000] [--steps 30]
                                        [--work /tmp/rnmt-memscale] [--threads 2]

For each size it generates a synthetic parallel corpus (random words from a fixed list on
the source side, a word-for-word mapping of them in reverse order on the target side; the
content does not matter, only the number of lines and pieces), binarises it with
`rnmt preprocess --spm-model` (one sentencepiece model, learnt once on a small corpus, so
that every size measures binarisation and not sentencepiece training), then trains a tiny
model for a fixed number of updates. It prints one table: lines → wall seconds and peak
memory of preprocess and of training: the kernel's peak RSS of the child (`ru_maxrss`),
and, sampled every 50 ms, its private (anonymous) memory and its mapped file pages. The
corpus is memory-mapped in training, so the pages of it that training touched count in the
RSS too, but they are page cache: shared, and dropped again when memory runs short.

Preprocessing streams the text and training maps the corpus, so private memory should stay
flat as the corpus grows, apart from the per-line arrays of the batch sampler (a dozen
bytes per line).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from common import run_child

RNMT = [sys.executable, "-m", "rnmt_cli.main"]
TINY_MODEL = ["--emb-dim", "32", "--hidden-dim", "32", "--dec-hidden-dim", "64",
              "--attn-dim", "32", "--output-dim", "64", "--dropout", "0"]
SYLLABLES = ("ka", "lo", "mi", "ne", "ru", "ta", "po", "si", "de", "gu", "fa", "zo")


def word_lists(n_words: int = 1000) -> tuple[list[str], list[str]]:
    """Source words from two or three syllables, and their target-side counterparts."""
    src = [a + b + c for a in SYLLABLES for b in SYLLABLES for c in ("",) + SYLLABLES]
    src = src[:n_words]
    return src, [w[::-1].upper() for w in src]


def write_corpus(prefix: Path, n_lines: int, seed: int, min_words: int = 3,
                 max_words: int = 15, chunk: int = 100_000) -> None:
    """`prefix.src` / `prefix.tgt`: n_lines random sentences and their mapped reversals."""
    src_words, tgt_words = word_lists()
    rng = np.random.default_rng(seed)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{prefix}.src", "w", encoding="utf-8") as fs, \
            open(f"{prefix}.tgt", "w", encoding="utf-8") as ft:
        for begin in range(0, n_lines, chunk):
            n = min(chunk, n_lines - begin)
            lengths = rng.integers(min_words, max_words + 1, n)
            ids = rng.integers(0, len(src_words), int(lengths.sum())).tolist()
            ends = np.cumsum(lengths).tolist()
            src_lines, tgt_lines, start = [], [], 0
            for end in ends:
                sentence = ids[start:end]
                src_lines.append(" ".join([src_words[i] for i in sentence]))
                tgt_lines.append(" ".join([tgt_words[i] for i in reversed(sentence)]))
                start = end
            fs.write("\n".join(src_lines) + "\n")
            ft.write("\n".join(tgt_lines) + "\n")


@dataclass
class Usage:
    seconds: float
    peak_rss_mb: float  # the kernel's peak (ru_maxrss): private memory and mapped file pages
    peak_anon_mb: float  # private (anonymous) memory, sampled every 50 ms
    peak_file_mb: float  # pages of mapped files (the corpus, libraries), sampled likewise


def _rss_parts(pid: int) -> tuple[float, float]:
    """(RssAnon, RssFile) of a running process in MB; zeros once it has gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0, 0.0
    parts = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    kib = lambda key: float(parts.get(key, "0 kB").split()[0])  # noqa: E731
    return kib("RssAnon") / 1024, kib("RssFile") / 1024


def run_measured(args: list[str], threads: int, log: Path) -> Usage:
    """Run a command to its end; its wall seconds and its own peak memory (stderr to `log`).

    The kernel's peak RSS counts the memory-mapped corpus pages the process touched, which
    are page cache (shared, dropped under memory pressure); the private part is what the
    process itself holds, so both are reported."""
    anon = file = 0.0

    def sample(pid: int) -> None:
        nonlocal anon, file
        a, f = _rss_parts(pid)
        anon, file = max(anon, a), max(file, f)

    with open(log, "wb") as err:
        run = run_child(args, threads, stdout=subprocess.DEVNULL, stderr=err,
                        extra_env={"PYTHONUNBUFFERED": "1"}, sample=sample)
    if run.exit_code != 0:
        raise RuntimeError(f"{' '.join(args[2:4])} failed, see {log}:\n{log.read_text()[-2000:]}")
    return Usage(run.seconds, run.peak_rss_mb, anon, file)


def learn_spm(work: Path, threads: int) -> Path:
    """One sentencepiece model, learnt by `rnmt preprocess` on a small corpus of the kind."""
    seed_dir = work / "seed"
    if not (seed_dir / "bin" / "spm.model").exists():
        write_corpus(seed_dir / "train", 20_000, seed=0)
        run_measured(RNMT + ["preprocess", "-s", "src", "-t", "tgt", "--train",
                             str(seed_dir / "train"), "--out", str(seed_dir / "bin"),
                             "--vocab-size", "2000", "--threads", str(threads)],
                     threads, seed_dir / "preprocess.log")
    return seed_dir / "bin" / "spm.model"


def measure(work: Path, n_lines: int, spm_model: Path, steps: int, threads: int,
            max_tokens: int = 2000) -> dict:
    """Generate, preprocess and train one corpus size; the usage of each step."""
    d = work / f"n{n_lines}"
    write_corpus(d / "corpus" / "train", n_lines, seed=n_lines)
    write_corpus(d / "corpus" / "valid", 500, seed=1)
    pre = run_measured(RNMT + ["preprocess", "-s", "src", "-t", "tgt",
                               "--train", str(d / "corpus" / "train"),
                               "--valid", str(d / "corpus" / "valid"),
                               "--spm-model", str(spm_model), "--out", str(d / "bin"),
                               "--threads", str(threads)],
                       threads, d / "preprocess.log")
    train = run_measured(RNMT + ["train", str(d / "bin"), "--save-dir", str(d / "run"),
                                 "--max-steps", str(steps), "--max-tokens", str(max_tokens),
                                 "--threads", str(threads), "--device", "cpu", "--no-plot",
                                 "--log-every", str(steps), *TINY_MODEL],
                         threads, d / "train.log")
    pieces = sum(len(np.load(d / "bin" / f"train.{side}.ids.npy", mmap_mode="r"))
                 for side in ("src", "tgt"))
    return {"lines": n_lines, "pieces": pieces, "train_steps": steps,
            **{f"preprocess_{k}": round(v, 1) for k, v in asdict(pre).items()},
            **{f"train_{k}": round(v, 1) for k, v in asdict(train).items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[250_000, 1_000_000, 4_000_000])
    parser.add_argument("--steps", type=int, default=30, help="training updates per size")
    parser.add_argument("--work", type=Path, default=Path("/tmp/rnmt-memscale"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--keep", action="store_true", help="keep each size's files")
    args = parser.parse_args()
    spm_model = learn_spm(args.work, args.threads)
    rows = []
    for n in args.sizes:
        rows.append(measure(args.work, n, spm_model, args.steps, args.threads))
        print(json.dumps(rows[-1]), file=sys.stderr)
        if not args.keep:
            shutil.rmtree(args.work / f"n{n}")
    print(f"Peak memory in MB: total = the kernel's peak RSS; private = anonymous memory; "
          f"file = mapped file pages (the corpus, libraries). Training: {args.steps} updates.")
    print("| lines | pieces (both sides) | preprocess s | preprocess total | preprocess private "
          "| train s | train total | train private | train file |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['lines']:,} | {r['pieces']:,} | {r['preprocess_seconds']:.0f} "
              f"| {r['preprocess_peak_rss_mb']:,.0f} | {r['preprocess_peak_anon_mb']:,.0f} "
              f"| {r['train_seconds']:.0f} | {r['train_peak_rss_mb']:,.0f} "
              f"| {r['train_peak_anon_mb']:,.0f} | {r['train_peak_file_mb']:,.0f} |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
