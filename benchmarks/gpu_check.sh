#!/usr/bin/env bash
# The one prepared GPU check (issues 4, 5 and 8), under 10 minutes on one GPU:
#   1. training speed of the reference model, fp32 and bf16 (benchmarks/train_speed.py);
#   2. the reference model trained REF_MINUTES, test_2016_flickr translated greedy and beam 5
#      in fp32 and bf16 (decode-only and whole-process sentences/s, BLEU);
#   3. the "best" configuration (examples/multi30k/best.toml) for de-en, en-de and en-fr, the
#      three trained side by side on the one GPU for BEST_MINUTES each, then translated
#      (beam 5) and scored on test_2016_flickr and test_2017_flickr by the recipe's run.sh;
#      MEMBERS=N trains N seeds of each side by side and lets run.sh choose on val between
#      each alone and their ensemble.
# MPS=1 starts the CUDA MPS daemon first (falling back without it).
# TESTS=1 also runs the fast test suite on the GPU machine (pytest-xdist, niced, beside the
# rest, at most TEST_TIMEOUT seconds); SPEED=0 skips step 1.
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

# Several processes share the GPU (three directions, their MEMBERS, the tests): MPS=1 lets
# their small kernels run at once instead of time-sliced, if the daemon starts and a CUDA
# call goes through it; else everything runs without it.
if [ "${MPS:-0}" = 1 ]; then
    if nvidia-cuda-mps-control -d && timeout 90 "$py" -c \
        "import torch; assert torch.ones(4, device='cuda').sum().item() == 4"; then
        log "MPS daemon running"
    else
        echo quit | nvidia-cuda-mps-control 2>/dev/null; log "MPS unavailable: time-sliced"
    fi
fi

# 0. The fast test suite, with CUDA present (tests default to --device auto), in the background.
if [ "${TESTS:-0}" = 1 ]; then
    (cd "$root" && nice -n 10 timeout "${TEST_TIMEOUT:-420}" "$py" -m pytest -v -m "not slow" \
        -p no:cacheprovider -n "${TEST_WORKERS:-4}" > "$logs/pytest.log" 2>&1) &
    tests_pid=$!
fi

# 1. Training speed, reference model, the peers' segmentation (which step 2 uses too).
if [ "${SPEED:-1}" = 1 ] || [ "$ref_minutes" != 0 ]; then
    "$py" "$root/benchmarks/reference_spm.py" --multi30k "$m30k" --out "$work/spm" > "$logs/spm.log" 2>&1
    "$rnmt" preprocess -s de -t en --train "$work/spm/raw/train" --valid "$work/spm/raw/val" \
        --test "$work/spm/raw/test" --spm-model "$work/spm/spm.model" --out "$work/bin" \
        > "$logs/preprocess.log" 2>&1
fi
for precision in ${PRECISIONS:-fp32 bf16}; do
    [ "${SPEED:-1}" = 1 ] || break
    "$py" "$root/benchmarks/train_speed.py" "$work/bin" --device "$device" --precision "$precision" \
        --batches "${SPEED_BATCHES:-40}" --warmup 5 > "$logs/train_speed.$precision.txt" 2>&1
    log "train speed $precision: $(tail -1 "$logs/train_speed.$precision.txt")"
done

# 2. Reference model: train, then translate in fp32 and bf16.
if [ "$ref_minutes" != 0 ]; then
"$rnmt" train "$work/bin" --save-dir "$work/ref" --overwrite --device "$device" --max-time "$ref_minutes" \
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
pids=()
for pair in de-en en-de en-fr; do
    RNMT="$rnmt" PYTHON="$py" bash "$root/examples/multi30k/run.sh" "${pair%-*}" "${pair#*-}" best \
        "$best_minutes" "$device" > "$logs/best.$pair.log" 2>&1 &
    pids+=($!)
done
wait "${pids[@]}"
for pair in de-en en-de en-fr; do
    dir="$root/work/multi30k/$pair-best"
    for path in "$dir"/results.tsv "$dir"/tuning.tsv "$dir"/run*/metrics.jsonl; do
        file="${path#"$dir"/}"  # run2/metrics.jsonl -> best.de-en.run2.metrics.jsonl
        [ -f "$path" ] && cp "$path" "$logs/best.$pair.${file//\//.}"
    done
    log "best $pair: $(grep -E "done|stopp" "$logs/best.$pair.log" | tr '\n' ' ')"
    cat "$logs/best.$pair.tuning.tsv" "$logs/best.$pair.results.tsv" 2>/dev/null \
        | tee -a "$out/summary.txt" >&2
done
if [ -n "${tests_pid:-}" ]; then
    wait "$tests_pid"; log "tests on the GPU machine (exit $?): $(tail -1 "$logs/pytest.log")"
    grep -E "FAILED|ERROR" "$logs/pytest.log" | head -40 | tee -a "$out/summary.txt" >&2
fi
[ "${MPS:-0}" = 1 ] && { echo quit | nvidia-cuda-mps-control 2>/dev/null; }
tar czf "$out/logs.tgz" -C "$work" logs
log "finished"
