"""The table of benchmarks/peers.sh: rnmt beside Joey NMT and OpenNMT-py, from one run's files.

    python benchmarks/peers_table.py --out OUT [--budget SECONDS] [--command TEXT]

Reads OUT/collect.txt (../shared/bench/collect.py's table and JSON for the peers' runs),
OUT/translate_runs/ (the peers' score.json of every translation round), OUT/rnmt/
(metrics.jsonl and logs of `rnmt train`, /usr/bin/time -v of training and of each
translation round, OUT/rnmt/translate_speed.*.md for decode-only speed) and the reference
translations in $PEERS/data/raw/test.en; prints a markdown table with rnmt ÷ OpenNMT-py
ratios and writes it, with every number, to OUT/table.json.

Translation speeds are medians over the rounds peers.sh ran (TRANSLATE_RUNS), peak memory
the largest; a run from before the rounds (one translation each) reads as one round.

rnmt's training throughput is read the way collect.py reads the peers': the median of the
log windows after the first (target tokens/s, </s> included, no padding), and as a check
the tokens of all windows after the first over the time they took.

OUT/speed/ (peers.sh with SPEED_ROUNDS or SPEED_ONLY) holds short trainings interleaved
in rounds: TOOLKIT.N.log per peer and rnmt{,_bf16}.N/metrics.jsonl per round N, logged
every 10 updates. Each gives the median of its windows after the first `WARM_UP` updates;
the table adds the median over the rounds of each toolkit's figure and of the per-round
ratios rnmt ÷ OpenNMT-py.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import statistics
from pathlib import Path

import sacrebleu
from common import cpu_name

PEERS = Path(os.environ.get("PEERS", Path.home() / ".cache" / "rnmt-peers"))
NAMES = {"joey": "Joey NMT 2.3.0", "onmt": "OpenNMT-py 3.5.1", "rnmt": "rnmt"}
VARIANTS = {"greedy": "greedy", "beam5": "beam 5", "beam5-int8": "beam 5, rnmt --quantize int8",
            "beam5-bf16": "beam 5, rnmt --precision bf16",
            "beam5-w2": "beam 5, rnmt --workers 2",
            "beam5-int8-w2": "beam 5, rnmt --quantize int8 --workers 2",
            "beam5-bf16-w2": "beam 5, rnmt --precision bf16 --workers 2"}
PEER_BEAM = {"greedy": "b1", "beam5": "b5"}


def time_v(path: Path) -> dict:
    """Wall seconds and peak RSS (MB) from a `/usr/bin/time -v` report."""
    out: dict = {}
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        key, _, value = line.strip().rpartition(": ")
        if key.startswith("Elapsed (wall clock)"):
            out["wall_s"] = clock_seconds(value)
        elif key == "Maximum resident set size (kbytes)":
            out["rss_mb"] = int(value) / 1024
        elif key == "Exit status":
            out["exit"] = int(value)
    return out


def clock_seconds(text: str) -> float:
    """Seconds from /usr/bin/time's wall clock, "[h:]m:ss.ss"."""
    seconds = 0.0
    for part in text.split(":"):
        seconds = seconds * 60 + float(part)
    return seconds


def median_or_none(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def steady_median(rates: list[float]) -> float | None:
    """The median of a training's log windows after the first (which holds the start)."""
    return statistics.median(rates[1:]) if len(rates) > 1 else None


def peer_rounds(out: Path, tk: str, beam: str) -> dict:
    """A peer's translation speeds over the rounds (score.json copies in OUT/translate_runs):
    medians of sentences/s, the largest peak RSS; {} when there are none."""
    decode, whole, rss = [], [], []
    for path in sorted((out / "translate_runs").glob(f"{tk}-{beam}-*.json")):
        r = json.loads(path.read_text())
        if r.get("rc") != "0" or not r.get("sentences"):
            continue
        if r.get("decode_only_s"):
            decode.append(r["sentences"] / float(r["decode_only_s"]))
        whole.append(r["sentences"] / clock_seconds(r["wall"]))
        rss.append(int(r["maxrss_kb"]) / 1024)
    if not whole:
        return {}
    return {"decode_sps": median_or_none(decode), "whole_sps": median_or_none(whole),
            "rss_mb": max(rss), "rounds": len(whole)}


def peers(out: Path) -> dict[str, dict]:
    """The peers' numbers from collect.py's JSON (printed after its markdown table)."""
    path = out / "collect.txt"
    text = path.read_text() if path.exists() else ""
    start = text.find("\n{")
    if start < 0:
        return {}
    collected = json.loads(text[start + 1 :])
    result = {}
    for tk, r in collected.items():
        own = r.get("own_tok_s_per_full_epoch") or r.get("own_tok_s_log_timestamps")
        if isinstance(own, list):
            own = statistics.median(own) if own else None
        row = {"params": r.get("params"), "train_tok_s": r.get("log_tok_s_steady_median"),
               "train_tok_s_check": own, "updates": r.get("steps"),
               "translated_step": r.get("final_ckpt_step"),
               "train_wall_s": r["train_time"].get("wall_s"),
               "train_rss_mb": r["train_time"].get("maxrss_mb")}
        for variant, key in PEER_BEAM.items():
            b = r.get(key) or {}
            row[variant] = {"decode_sps": b.get("sents_per_s_decode"),
                            "whole_sps": b.get("sents_per_s_wall"),
                            "rss_mb": b.get("maxrss_mb"), "bleu": b.get("bleu"), "rounds": 1,
                            **peer_rounds(out, tk, key)}
        result[tk] = row
    return result


def metrics_records(path: Path) -> list[dict]:
    """The records of an rnmt run's metrics.jsonl (train windows, validations)."""
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def rnmt_training(r: Path, tag: str = "") -> dict:
    """rnmt's training figures from OUT/rnmt: the run `run{tag}` with its `train{tag}.log`
    and `train{tag}.time` (tag "" for the fp32 run, "_bf16" for the --precision bf16 one);
    {} when that run is not there."""
    metrics = r / f"run{tag}" / "metrics.jsonl"
    if not metrics.exists():
        return {}
    records = metrics_records(metrics)
    train = [x for x in records if x.get("kind") == "train"]
    rates = [x["tokens_per_s"] for x in train]
    check = None
    if len(train) > 1:  # windows after the first: tokens = rate x window duration
        spans = [b["elapsed"] - a["elapsed"] for a, b in zip(train, train[1:])]
        check = sum(x["tokens_per_s"] * s for x, s in zip(train[1:], spans)) / sum(spans)
    log_path = r / f"train{tag}.log"
    log = log_path.read_text() if log_path.exists() else ""
    params = re.search(r"([\d,]+) parameters", log)
    steps = max((x.get("step", 0) for x in records), default=None)
    timed = time_v(r / f"train{tag}.time")
    return {"params": int(params.group(1).replace(",", "")) if params else None,
            "train_tok_s": steady_median(rates),
            "train_tok_s_check": check, "updates": steps, "translated_step": steps,
            "train_wall_s": timed.get("wall_s"), "train_rss_mb": timed.get("rss_mb")}


# A peer's log window: the update it ends at and its target tokens/s (collect.py's
# patterns).
PEER_WINDOW = {"onmt": re.compile(r"Step (\d+)/\s*\d+; .*; \s*\d+/\s*(\d+) tok/s;"),
               "joey": re.compile(r"Step:\s+(\d+), .*Tokens per Sec:\s+(\d+)")}
# Windows of a speed round ending at this update or before are left out. The first window
# holds each toolkit's start-up: in three rounds of 240 s, OpenNMT-py's first 10 updates
# ran at 918-1,127 target tokens/s against medians of 2,600-3,104 after update 100, and
# rnmt's first at 3,346-4,240 (fp32) and 4,369-6,505 (bf16) against 3,545-4,767 and
# 7,300-8,504. The first 100 updates rather than the first window leave out any slower
# start with room to spare. That leaves ~10 of OpenNMT-py's windows in a 240-s round.
WARM_UP = 100


def window_rates(path: Path) -> list[float]:
    """Target tokens/s of the log windows after update `WARM_UP` of one training of a
    speed round: a peer's stdout (TOOLKIT.N.log), or rnmt's metrics.jsonl."""
    if path.name == "metrics.jsonl":
        windows = [(x["step"], x["tokens_per_s"]) for x in metrics_records(path)
                   if x.get("kind") == "train"]
    else:
        pattern = PEER_WINDOW[path.name.split(".")[0]]
        windows = [(int(m.group(1)), float(m.group(2)))
                   for m in map(pattern.search, path.read_text().splitlines()) if m]
    return [rate for step, rate in windows if step > WARM_UP]


def speed_rounds(out: Path) -> dict[str, dict[int, float | None]]:
    """Per toolkit ("onmt", "joey", "rnmt", "rnmt_bf16") and round, the median of its
    windows after `WARM_UP` in OUT/speed; {} when peers.sh ran no rounds."""
    speed = out / "speed"
    files: dict[str, dict[int, Path]] = {}
    for path in speed.glob("*.*.log") if speed.is_dir() else []:
        tk, n, _ = path.name.split(".")
        if tk in PEER_WINDOW and n.isdigit():
            files.setdefault(tk, {})[int(n)] = path
    for path in speed.glob("rnmt*.*/metrics.jsonl") if speed.is_dir() else []:
        tk, n = path.parent.name.split(".")
        if n.isdigit():
            files.setdefault(tk, {})[int(n)] = path
    return {tk: {n: median_or_none(window_rates(path)) for n, path in sorted(by_round.items())}
            for tk, by_round in files.items()}


def speed_rows(rounds: dict[str, dict[int, float | None]]
               ) -> list[tuple[str, list[float | None], float | None]]:
    """Rows of the interleaved rounds: label, each toolkit's median over the rounds (joey,
    onmt, rnmt; the peers' only on the fp32 row) and the median of the per-round ratios
    against OpenNMT-py (None without it)."""
    def median_of(tk: str) -> float | None:
        return median_or_none([x for x in rounds.get(tk, {}).values() if x])

    base = rounds.get("onmt", {})
    rows = []
    for tk, label in (("rnmt", ""), ("rnmt_bf16", ", rnmt --precision bf16")):
        ours = {n: x for n, x in rounds.get(tk, {}).items() if x}
        if not ours:
            continue
        ratios = [x / base[n] for n, x in ours.items() if base.get(n)]
        figures = [median_of("joey"), median_of("onmt")] if tk == "rnmt" else [None, None]
        rows.append((f"training{label}, {len(ours)} interleaved rounds: target tokens/s "
                     "(median of rounds; ratio: median of the rounds' ratios)",
                     [*figures, median_of(tk)], median_or_none(ratios)))
    return rows


def bf16_training(r: Path, refs: list[str]) -> dict:
    """The --precision bf16 run's training figures and the BLEU of its last checkpoint
    (beam 5, translated once by peers.sh); {} when peers.sh ran no such run."""
    figures = rnmt_training(r, "_bf16")
    hyp = r / "run_bf16" / "test.beam5.en"
    hyps = hyp.read_text(encoding="utf-8").splitlines() if hyp.exists() else []
    if figures and len(hyps) == len(refs):
        figures["bleu"] = round(sacrebleu.corpus_bleu(hyps, [refs]).score, 2)
    return figures


def decode_only(r: Path) -> dict[str, list[float]]:
    """Sentences/s decode-only per variant, one number per round, from translate_speed.py's
    markdown tables (translate_speed.md of a run before the rounds, translate_speed.N.md)."""
    speeds: dict[str, list[float]] = {}
    for path in sorted(r.glob("translate_speed*.md")):
        rows = [[c.strip() for c in line.strip().strip("|").split("|")]
                for line in path.read_text().splitlines() if line.startswith("|")]
        if not rows or "variant" not in rows[0] or "decode-only sent/s" not in rows[0]:
            continue
        name, speed = rows[0].index("variant"), rows[0].index("decode-only sent/s")
        for row in rows[2:]:
            if len(row) > speed:
                speeds.setdefault(row[name], []).append(float(row[speed]))
    return speeds


def rnmt_translations(r: Path, refs: list[str]) -> dict:
    speeds = decode_only(r)
    result = {}
    for variant in VARIANTS:
        o = r / f"translate_{variant}"
        if not o.is_dir():
            continue  # skipped: this rnmt lacks the variant's option
        hyp = o / "hyp.en"
        hyps = hyp.read_text(encoding="utf-8").splitlines() if hyp.exists() else []
        rounds = [time_v(path) for path in sorted(o.glob("time*.txt"))]
        ok = [t for t in rounds if t.get("exit") == 0] if len(hyps) == len(refs) else []
        result[variant] = {
            "decode_sps": median_or_none(speeds.get(variant, [])),
            "whole_sps": median_or_none([len(refs) / t["wall_s"] for t in ok]),
            "rss_mb": max((t["rss_mb"] for t in ok), default=None),
            "bleu": round(sacrebleu.corpus_bleu(hyps, [refs]).score, 2) if ok else None,
            "rounds": len(ok),
        }
    return result


def fmt(value, digits: int = 0) -> str:
    if value is None:
        return "n/a"
    return f"{value:,.{digits}f}"


def ratio(a, b, difference: bool = False) -> str:
    if a is None or b is None or (not difference and not b):
        return "n/a"
    return f"{a - b:+.2f}" if difference else f"{a / b:.2f}×"


def rounds_text(tk: dict[str, dict]) -> str:
    """How many translation rounds the medians are of, e.g. "3 rounds"."""
    counts = {block["rounds"] for row in tk.values() for block in row.values()
              if isinstance(block, dict) and "rounds" in block}
    if not counts:
        return "no rounds"
    low, high = min(counts), max(counts)
    n = f"{low}" if low == high else f"{low}–{high}"
    return f"{n} round{'s' if high > 1 else ''}"


def machine() -> str:
    return f"{cpu_name()}, {os.cpu_count()} CPUs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--budget", type=float, help="training seconds per toolkit")
    parser.add_argument("--command", default="benchmarks/peers.sh")
    args = parser.parse_args()
    refs = (PEERS / "data" / "raw" / "test.en").read_text(encoding="utf-8").splitlines()
    tk = peers(args.out)
    tk["rnmt"] = {**rnmt_training(args.out / "rnmt"),
                  **rnmt_translations(args.out / "rnmt", refs)}
    bf16 = bf16_training(args.out / "rnmt", refs)
    if bf16:
        tk["rnmt"]["train_bf16"] = bf16
    columns = [t for t in ("joey", "onmt", "rnmt") if t in tk]
    onmt = tk.get("onmt", {})

    rows: list[tuple[str, list[str], str]] = []

    def add(label: str, key: str, digits: int = 0, variant: str | None = None,
            difference: bool = False) -> None:
        def get(t: str):
            block = tk[t].get(variant, {}) if variant else tk[t]
            return block.get(key)

        cells = [("—" if variant and variant not in tk[t] else fmt(get(t), digits))
                 for t in columns]
        if variant == "train_bf16":  # bf16 training: against OpenNMT-py's training
            base = onmt if key != "bleu" else onmt.get("beam5", {})
        elif variant:  # int8 and bf16 beam search: against OpenNMT-py's fp32 beam 5
            base = onmt.get("beam5" if variant.startswith("beam5") else variant, {})
        else:
            base = onmt
        rows.append((label, cells, ratio(get("rnmt"), base.get(key), difference)))

    add("parameters", "params")
    add("training: target tokens/s (median of log windows)", "train_tok_s")
    add("training: target tokens/s (check: log timestamps)", "train_tok_s_check")
    add("training: updates in the budget", "updates")
    add("training: whole process, s", "train_wall_s", 1)
    add("training: peak RSS, MB", "train_rss_mb")
    if "train_bf16" in tk["rnmt"]:
        label = "training, rnmt --precision bf16"
        add(f"{label}: target tokens/s (median of log windows)", "train_tok_s", 0, "train_bf16")
        add(f"{label}: target tokens/s (check: log timestamps)", "train_tok_s_check", 0,
            "train_bf16")
        add(f"{label}: updates in the budget", "updates", 0, "train_bf16")
        add(f"{label}: peak RSS, MB", "train_rss_mb", 0, "train_bf16")
        add(f"{label}: BLEU of its last checkpoint, beam 5", "bleu", 2, "train_bf16",
            difference=True)
    rounds = speed_rounds(args.out)
    for label, figures, rate in speed_rows(rounds):
        cells = [fmt(x) if x is not None else "—"
                 for t, x in zip(("joey", "onmt", "rnmt"), figures) if t in columns]
        rows.append((label, cells, f"{rate:.2f}×" if rate else "n/a"))
    for variant, label in VARIANTS.items():
        if variant not in tk["rnmt"] and variant not in PEER_BEAM:
            continue
        add(f"{label}: sentences/s decode-only", "decode_sps", 1, variant)
        add(f"{label}: sentences/s whole process", "whole_sps", 1, variant)
        add(f"{label}: peak RSS, MB", "rss_mb", 0, variant)
        add(f"{label}: BLEU", "bleu", 2, variant, difference=True)

    date = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    budget = f"{args.budget:g} s" if args.budget else "?"
    print(f"Reference model, Multi30k de→en, {budget} of CPU training each (2 threads), "
          f"test_2016_flickr (1000 sentences, batch 64); {date}, {machine()}; "
          f"`{args.command}`. Ratio: rnmt ÷ OpenNMT-py (int8/bf16/workers rows against its fp32 "
          "beam 5); BLEU: difference. sacreBLEU 13a, cased, detokenised. Translation "
          f"sentences/s: median of {rounds_text(tk)}; peak RSS: the largest.\n")
    print("| | " + " | ".join(NAMES[t] for t in columns) + " | rnmt ÷ OpenNMT-py |")
    print("|---|" + "---:|" * (len(columns) + 1))
    for label, cells, r in rows:
        print(f"| {label} | " + " | ".join(cells) + f" | {r} |")
    steps = {t: tk[t].get("translated_step") for t in columns}
    print(f"\nTranslated checkpoints (update): "
          + ", ".join(f"{NAMES[t]} {fmt(s)}" for t, s in steps.items()))
    (args.out / "table.json").write_text(json.dumps(
        {"date": date, "machine": machine(), "budget_s": args.budget, "command": args.command,
         "toolkits": tk, "speed_rounds": rounds}, indent=1) + "\n")


if __name__ == "__main__":
    main()
