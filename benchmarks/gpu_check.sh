#!/usr/bin/env bash
# The one prepared GPU check (issues 4, 5 and 8), under 10 minutes on one GPU:
#   1. training speed of the reference model, fp32 and bf16 (benchmarks/train_speed.py);
#   2. the reference model trained REF_MINUTES, test_2016_flickr translated greedy and beam 5
#      in fp32 and bf16 (decode-only and whole-process sentences/s, BLEU);
#   3. the "best" configuration (examples/multi30k/best.toml) for de-en, en-de and en-fr, the
#      three trained side by side on the one GPU for BEST_MINUTES each, then translated
#      (beam 5) and scored on test_2016_flickr and test_2017_flickr by the recipe's run.sh.
#
# Usage: benchmarks/gpu_check.sh MULTI30K_DIR OUT_DIR [REF_MINUTES] [BEST_MINUTES]
# Runs from a source tree without installing: cli/ is put on the path as rnmt_cli through a
# symlink, and a small `rnmt` wrapper stands in for the console script. OUT holds two files
# (the device tool returns only a few): summary.txt with every result, logs.tgz with the logs.
# REF_MINUTES 0 skips step 2.
set -uo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
m30k="$(cd "$1" && pwd)"; mkdir -p "$2"; out="$(cd "$2" && pwd)"
ref_minutes="${3:-1}"; best_minutes="${4:-4}"
py="${PYTHON:-python3}"; device="${DEVICE:-cuda}"
work="${WORK:-/tmp/rnmt-gpu}"; shim="$work/shim"; logs="$work/logs"
mkdir -p "$shim/bin" "$logs"
ln -sfn "$root/cli" "$shim/rnmt_cli"
export PYTHONPATH="$root:$shim${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
printf '#!/bin/sh\nexec %s -m rnmt_cli.main "$@"\n' "$(command -v "$py")" > "$shim/bin/rnmt"
chmod +x "$shim/bin/rnmt"
rnmt="$shim/bin/rnmt"
log() { echo "[gpu_check $(date +%T)] $*" | tee -a "$out/summary.txt" >&2; }

{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || echo "no GPU"; } > "$logs/gpu.txt"
"$py" -c "import torch, sentencepiece; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'sentencepiece', sentencepiece.__version__)" >> "$logs/gpu.txt"
log "$(tr '\n' ' ' < "$logs/gpu.txt")"

# 1. Training speed, reference model, the peers' segmentation.
"$py" "$root/benchmarks/reference_spm.py" --multi30k "$m30k" --out "$work/spm" > "$logs/spm.log" 2>&1
"$rnmt" preprocess -s de -t en --train "$work/spm/raw/train" --valid "$work/spm/raw/val" \
    --test "$work/spm/raw/test" --spm-model "$work/spm/spm.model" --out "$work/bin" > "$logs/preprocess.log" 2>&1
for precision in ${PRECISIONS:-fp32 bf16}; do
    "$py" "$root/benchmarks/train_speed.py" "$work/bin" --device "$device" --precision "$precision" \
        --batches "${SPEED_BATCHES:-40}" --warmup 5 > "$logs/train_speed.$precision.txt" 2>&1
    log "train speed $precision: $(tail -1 "$logs/train_speed.$precision.txt")"
done

# 2. Reference model: train, then translate in fp32 and bf16.
if [ "$ref_minutes" != 0 ]; then
"$rnmt" train "$work/bin" --save-dir "$work/ref" --device "$device" --max-time "$ref_minutes" \
    --max-epochs 1000 --log-every 200 > "$logs/ref_train.log" 2>&1
log "reference training: $(grep -E "done|stopp" "$logs/ref_train.log" | tail -1)"
"$py" "$root/benchmarks/translate_speed.py" "$work/ref/best.pt" "$work/spm/raw/test.de" \
    "$work/spm/raw/test.en" --device "$device" --runs "${TRANSLATE_RUNS:-3}" \
    --variants ${VARIANTS:-greedy beam5 beam5-bf16 greedy-bf16} > "$logs/translate_speed.txt" 2>&1
log "translate speed:"; cat "$logs/translate_speed.txt" | tee -a "$out/summary.txt" >&2
fi

# 3. Best configuration, three directions side by side on the one GPU.
[ -f "$root/work/multi30k/raw/train.de" ] ||
    "$py" "$root/examples/multi30k/prepare.py" --from "$m30k" --out "$root/work/multi30k" > "$logs/prepare.log" 2>&1
for pair in de-en en-de en-fr; do
    RNMT="$rnmt" PYTHON="$py" bash "$root/examples/multi30k/run.sh" "${pair%-*}" "${pair#*-}" best \
        "$best_minutes" "$device" > "$logs/best.$pair.log" 2>&1 &
done
wait
for pair in de-en en-de en-fr; do
    dir="$root/work/multi30k/$pair-best"
    cp "$dir"/results.tsv "$logs/best.$pair.results.tsv" 2>/dev/null
    cp "$dir"/run/metrics.jsonl "$logs/best.$pair.metrics.jsonl" 2>/dev/null
    cp "$dir"/tuning.tsv "$logs/best.$pair.tuning.tsv" 2>/dev/null
    log "best $pair: $(grep -E "done|stopp" "$logs/best.$pair.log" | tail -1)"
    cat "$logs/best.$pair.tuning.tsv" "$logs/best.$pair.results.tsv" 2>/dev/null \
        | tee -a "$out/summary.txt" >&2
done
tar czf "$out/logs.tgz" -C "$work" logs
log "finished"
