#!/usr/bin/env bash
# rnmt beside Joey NMT 2.3.0 and OpenNMT-py 3.5.1 in ONE run on this machine: the reference
# model of ../shared/bench/README.md trained for the same wall-clock budget by each, on the
# same raw Multi30k de->en text and the same sentencepiece model, then test_2016_flickr
# (1000 sentences, batch 64) translated greedy and beam 5 (rnmt also beam 5 with
# --quantize int8, with --precision bf16, and with --workers 2, alone and with int8), and
# one table of the numbers. On a CPU with bf16 matrix units rnmt also trains a second time,
# with --precision bf16, for the same budget (RNMT_BF16_TRAIN=0 leaves that out).
#
# Usage: benchmarks/peers.sh SECONDS [OUT]      (OUT defaults to work/peers)
#   SECONDS  training budget of each toolkit (the shared bench uses 900)
#   TRANSLATE_ONLY=1 benchmarks/peers.sh SECONDS [OUT] skips training and translates again
#   with the checkpoints an earlier run of the same SECONDS left (translation rows re-measured
#   after a change to search; the training rows stay those of that earlier run).
#   TRANSLATE_RUNS=N (default 3): rounds of translation, each toolkit and variant in turn.
#   PEER_TOOLKITS="onmt" (default "joey onmt"): the peers to run beside rnmt; leaving Joey
#   NMT out saves ~20 minutes (its training and translations).
#   SPEED_ROUNDS=N (default 0): after the trainings, N rounds of short trainings from
#   scratch, SPEED_SECONDS each (default 240), every peer then rnmt (then rnmt bf16) in
#   each round, logging every 10 updates: training throughput measured interleaved, so
#   that a slow spell of this shared machine slows every toolkit alike (the 15-minute
#   trainings run one after the other, and their ratio moves with the machine). The table
#   adds the median over the rounds of each one's throughput after its first 100 updates
#   (peers_table.py, WARM_UP) and of the per-round ratios.
#   SPEED_ONLY=1: the rounds alone (3 unless SPEED_ROUNDS says), the other rows again
#   from an earlier run's files in OUT, as with TRANSLATE_ONLY.
# Needs the peers set up once: PEERS (default ~/.cache/rnmt-peers) holding joey/, onmt/,
# tools/ and data/ (../shared/bench/setup-peers.sh, then prep_data.py). Run nothing else
# heavy meanwhile: the toolkits run one at a time on 2 threads each.
#
# The peers are driven only through ../shared/bench/ (run-train.sh, run-translate.sh,
# collect.py; their runs go to $PEERS/runs/peers-joey and peers-onmt). rnmt gets the same
# raw text ($PEERS/data/raw) and `rnmt preprocess --spm-model $PEERS/data/spm/spm.model`,
# which gives it the peers' vocabularies (the pieces seen in each training side), and
# `rnmt train --config examples/multi30k/reference.toml --max-time SECONDS/60`.
# Budgets under 300 s log (and OpenNMT-py checkpoints) every 10 updates instead of 50, so
# a short test still has throughput figures and an OpenNMT-py checkpoint to translate.
#
# Measured: training target tokens/s (real non-pad target pieces, </s> included; each
# toolkit's own 50-update log windows, median after the first, plus a check from the log
# timestamps), updates done, whole-process wall and peak RSS (/usr/bin/time -v);
# translation sentences/s decode-only (each peer's own timer; rnmt's from
# benchmarks/translate_speed.py --decode-only, model already loaded) and whole process
# (/usr/bin/time -v), medians of TRANSLATE_RUNS rounds (default 3, ~6 min each), peak RSS
# (the largest), and sacreBLEU (13a, cased, detokenised). Output:
# OUT/table.md and OUT/table.json (benchmarks/peers_table.py), all logs under OUT.
set -uo pipefail
budget="${1:?usage: benchmarks/peers.sh SECONDS [OUT]}"
root="$(cd "$(dirname "$0")/.." && pwd)"
mkdir -p "${2:-$root/work/peers}"; out="$(cd "${2:-$root/work/peers}" && pwd)"
export PEERS="${PEERS:-$HOME/.cache/rnmt-peers}"
bench="${BENCH:-$root/../shared/bench}"
py="${PYTHON:-$root/.venv/bin/python}"
rnmt=("$py" -m rnmt_cli.main)
threads=2
export OMP_NUM_THREADS=$threads MKL_NUM_THREADS=$threads PYTHONUNBUFFERED=1
log() { echo "[peers $(date +%T)] $*" | tee -a "$out/run.log" >&2; }

for need in "$PEERS/joey/bin/python" "$PEERS/onmt/bin/onmt_train" "$PEERS/tools/bin/python" \
            "$PEERS/data/spm/spm.model" "$PEERS/data/raw/train.de" "$bench/run-train.sh"; do
    [ -e "$need" ] || { echo "peers.sh: $need is missing; set up the peers first" \
        "(../shared/bench/setup-peers.sh, then prep_data.py)" >&2; exit 2; }
done
translate_only="${TRANSLATE_ONLY:-0}"
speed_only="${SPEED_ONLY:-0}"
speed_rounds="${SPEED_ROUNDS:-0}"
[ "$speed_only" = 1 ] && [ "$speed_rounds" = 0 ] && speed_rounds=3
speed_seconds="${SPEED_SECONDS:-240}"
if [ "$translate_only" = 1 ] || [ "$speed_only" = 1 ]; then
    [ -e "$out/rnmt/run/last.pt" ] || { echo "peers.sh: TRANSLATE_ONLY=1 or SPEED_ONLY=1" \
        "needs an earlier run's files; $out/rnmt/run/last.pt is missing" >&2; exit 2; }
else
    : > "$out/run.log"
fi
log "budget ${budget}s per toolkit, out $out, $(nproc) CPUs: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)"

# --- configuration of a short test run --------------------------------------------------
toolkits="${PEER_TOOLKITS:-joey onmt}"
declare -A names=([joey]="Joey NMT" [onmt]="OpenNMT-py")
for tk in $toolkits; do
    [ -n "${names[$tk]:-}" ] || { echo "peers.sh: unknown toolkit $tk in PEER_TOOLKITS" >&2; exit 2; }
done
log_every=50; joey_cfg=""; onmt_cfg=""
if [ "$budget" -lt 300 ]; then
    log_every=10
    joey_cfg="$out/joey_rnn.yaml"; onmt_cfg="$out/onmt_rnn.yaml"
    sed -e 's/^\(  logging_freq:\).*/\1 10/' "$bench/configs/joey_rnn.yaml" > "$joey_cfg"
    sed -e 's/^save_checkpoint_steps:.*/save_checkpoint_steps: 10/' \
        -e 's/^report_every:.*/report_every: 10/' "$bench/configs/onmt_rnn.yaml" > "$onmt_cfg"
fi

# bf16 training runs on a CPU whose bf16 matrix units oneDNN uses (AMX / AVX512-BF16;
# elsewhere bf16 would be emulated, so there is no row)
bf16_train=0
if [ "${RNMT_BF16_TRAIN:-auto}" != 0 ] && "$py" -c \
    "import sys, torch; sys.exit(not torch.ops.mkldnn._is_mkldnn_bf16_supported())" 2>/dev/null; then
    bf16_train=1
fi

# rnmt's training of the reference model, as every run here takes it; each adds
# --save-dir, --max-time and --log-every (and --precision bf16)
reference_train=(--config "$root/examples/multi30k/reference.toml" --max-epochs 1000
                 --threads $threads --device cpu --no-plot)

# --- training, one toolkit at a time ----------------------------------------------------
r="$out/rnmt"
if [ "$translate_only" != 1 ] && [ "$speed_only" != 1 ]; then
    for tk in $toolkits; do
        log "train ${names[$tk]}"
        cfg="${tk}_cfg"
        "$bench/run-train.sh" $tk "$budget" peers-$tk ${!cfg} >> "$out/run.log" 2>&1
    done

    rm -rf "$r"; mkdir -p "$r"
    log "rnmt preprocess"
    "${rnmt[@]}" preprocess -s de -t en --train "$PEERS/data/raw/train" \
        --valid "$PEERS/data/raw/val" --test "$PEERS/data/raw/test" \
        --spm-model "$PEERS/data/spm/spm.model" --out "$r/bin" --threads $threads 2> "$r/preprocess.log"
    minutes=$("$py" -c "print($budget / 60)")
    log "train rnmt (--max-time $minutes)"
    /usr/bin/time -v -o "$r/train.time" "${rnmt[@]}" train "$r/bin" --save-dir "$r/run" \
        --max-time "$minutes" --log-every $log_every "${reference_train[@]}" 2> "$r/train.log"
    log "rnmt train exit $? ($(tail -1 "$r/train.log"))"
    # The same budget again with --precision bf16, and its last checkpoint translated once,
    # beam 5, for the BLEU its extra updates bring.
    if [ "$bf16_train" = 1 ]; then
        log "train rnmt --precision bf16 (--max-time $minutes)"
        /usr/bin/time -v -o "$r/train_bf16.time" "${rnmt[@]}" train "$r/bin" \
            --save-dir "$r/run_bf16" --max-time "$minutes" --log-every $log_every \
            "${reference_train[@]}" --precision bf16 2> "$r/train_bf16.log"
        log "rnmt train --precision bf16 exit $? ($(tail -1 "$r/train_bf16.log"))"
        "${rnmt[@]}" translate -m "$r/run_bf16/last.pt" --beam 5 --batch-size 64 \
            --threads $threads --device cpu < "$PEERS/data/raw/test.de" \
            > "$r/run_bf16/test.beam5.en" 2> "$r/run_bf16/translate.log" \
            || log "rnmt translate of the bf16 run failed: $(tail -1 "$r/run_bf16/translate.log")"
    else
        rm -rf "$r/run_bf16"
        log "no bf16 training run (RNMT_BF16_TRAIN=0, or no bf16 matrix units here)"
    fi
fi

# --- training throughput, interleaved rounds ----------------------------------------------
# Each round trains every toolkit from scratch for SPEED_SECONDS, one after the other; the
# table reads the log windows of each (10 updates each) after its first 100 updates.
if [ "$speed_rounds" -gt 0 ]; then
    s="$out/speed"; rm -rf "$s"; mkdir -p "$s"
    sed -e 's/^\(  logging_freq:\).*/\1 10/' "$bench/configs/joey_rnn.yaml" > "$s/joey_rnn.yaml"
    # checkpoints every 10,000 updates: none in a round
    sed -e 's/^save_checkpoint_steps:.*/save_checkpoint_steps: 10000/' \
        -e 's/^report_every:.*/report_every: 10/' "$bench/configs/onmt_rnn.yaml" > "$s/onmt_rnn.yaml"
    speed_minutes=$("$py" -c "print($speed_seconds / 60)")
    for round in $(seq 1 "$speed_rounds"); do
        for tk in $toolkits; do
            log "speed round $round/$speed_rounds: train ${names[$tk]} ${speed_seconds}s"
            "$bench/run-train.sh" $tk "$speed_seconds" peers-$tk-speed "$s/${tk}_rnn.yaml" \
                >> "$out/run.log" 2>&1
            cp "$PEERS/runs/peers-$tk-speed/train.stdout" "$s/$tk.$round.log"
        done
        for tag in "" _bf16; do
            [ -z "$tag" ] || [ "$bf16_train" = 1 ] || continue
            log "speed round $round/$speed_rounds: train rnmt${tag:+ --precision bf16} ${speed_seconds}s"
            "${rnmt[@]}" train "$r/bin" --save-dir "$s/rnmt$tag.$round" \
                --max-time "$speed_minutes" --log-every 10 "${reference_train[@]}" \
                ${tag:+--precision bf16} 2> "$s/rnmt$tag.$round.log" \
                || log "rnmt train failed: $(tail -1 "$s/rnmt$tag.$round.log")"
            rm -f "$s/rnmt$tag.$round"/*.pt  # the metrics are what the table reads
        done
    done
fi

# --- translation -------------------------------------------------------------------------
# rnmt variants: name, beam, extra options ("${options[@]%% *}": the names); a variant
# whose option this rnmt lacks is skipped
help=$(COLUMNS=200 "${rnmt[@]}" translate --help 2>&1)
options=()
for v in "greedy 1" "beam5 5" "beam5-int8 5 --quantize int8" "beam5-bf16 5 --precision bf16" \
         "beam5-w2 5 --workers 2" "beam5-int8-w2 5 --workers 2 --quantize int8" \
         "beam5-bf16-w2 5 --workers 2 --precision bf16"; do
    set -- $v
    if [ $# -gt 2 ] && ! grep -q -- "$3" <<< "$help"; then
        log "skip rnmt $1: rnmt translate has no $3"; continue
    fi
    options+=("$v")
done

# TRANSLATE_RUNS rounds (default 3), each translating with every toolkit and variant in
# turn, so that a slow spell of this shared machine slows all of them alike; the table takes
# each one's median. The peers' reports of every round are kept in OUT/translate_runs.
runs="${TRANSLATE_RUNS:-3}"
if [ "$speed_only" = 1 ]; then
    runs=0  # the translation rows stay those of the earlier run
else
    rm -rf "$out/translate_runs"; mkdir -p "$out/translate_runs"
    rm -f "$r"/translate_*/time*.txt "$r"/translate_speed*
fi
for run in $(seq 1 "$runs"); do
    for tk in $toolkits; do
        for beam in 1 5; do
            log "translate $tk beam $beam (round $run/$runs)"
            "$bench/run-translate.sh" $tk $beam peers-$tk >> "$out/run.log" 2>&1
            cp "$PEERS/runs/peers-$tk/translate_b$beam/score.json" \
                "$out/translate_runs/$tk-b$beam-$run.json" 2>/dev/null \
                || log "no score.json from $tk beam $beam"
        done
    done
    for v in "${options[@]}"; do
        set -- $v
        name=$1 beam=$2; shift 2
        o="$r/translate_$name"; mkdir -p "$o"
        log "translate rnmt $name (round $run/$runs)"
        /usr/bin/time -v -o "$o/time.$run.txt" "${rnmt[@]}" translate -m "$r/run/last.pt" \
            --beam "$beam" --batch-size 64 --threads $threads --device cpu "$@" \
            < "$PEERS/data/raw/test.de" > "$o/hyp.en" 2> "$o/log.txt" \
            || log "rnmt translate $name failed: $(tail -1 "$o/log.txt")"
    done
    log "rnmt decode-only speed, benchmarks/translate_speed.py (round $run/$runs)"
    "$py" "$root/benchmarks/translate_speed.py" "$r/run/last.pt" "$PEERS/data/raw/test.de" \
        "$PEERS/data/raw/test.en" --runs 1 --decode-only --threads $threads --batch-size 64 \
        --variants "${options[@]%% *}" > "$r/translate_speed.$run.md" \
        2> "$r/translate_speed.$run.log" \
        || log "translate_speed.py failed: $(tail -1 "$r/translate_speed.$run.log")"
done

# --- the table ---------------------------------------------------------------------------
collect_runs=()  # a peer left out is read from a run folder that is not there
for tk in joey onmt; do
    if [[ " $toolkits " == *" $tk "* ]]; then collect_runs+=("RUN_$tk=peers-$tk")
    else collect_runs+=("RUN_$tk=not-run"); fi
done
python3 "$bench/collect.py" "${collect_runs[@]}" > "$out/collect.txt" 2>&1 \
    || log "collect.py failed: $(tail -1 "$out/collect.txt")"
command="benchmarks/peers.sh $budget"
[ "$toolkits" != "joey onmt" ] && command="PEER_TOOLKITS=\"$toolkits\" $command"
[ "$translate_only" = 1 ] && command="$command (training), then TRANSLATE_ONLY=1 $command (translation)"
speed="SPEED_ROUNDS=$speed_rounds SPEED_SECONDS=$speed_seconds"
if [ "$speed_only" = 1 ]; then
    command="$command (training, translation), then SPEED_ONLY=1 $speed $command (rounds)"
elif [ "$speed_rounds" -gt 0 ]; then
    command="$speed $command"
fi
"$py" "$root/benchmarks/peers_table.py" --out "$out" --budget "$budget" \
    --command "$command" | tee "$out/table.md"
log "done: $out/table.md, $out/table.json"
