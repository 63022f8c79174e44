#!/usr/bin/env bash
# One prepared GPU check (issue 8): train the reference model on Multi30k de-en for a fixed
# wall-clock budget on CUDA, translate test_2016_flickr (greedy and beam 5, batch 64) and
# score it, printing training tokens/s and translation sentences/s.
#
# Usage: benchmarks/gpu_check.sh MULTI30K_DIR OUT_DIR [TRAIN_MINUTES]
# Runs from a source tree without installing: the CLI package dir cli/ is put on the path
# as rnmt_cli through a symlink.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
m30k="$1"; out="$2"; minutes="${3:-3}"
mkdir -p "$out" /tmp/rnmt-shim
ln -sfn "$root/cli" /tmp/rnmt-shim/rnmt_cli
export PYTHONPATH="$root:/tmp/rnmt-shim${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py="${PYTHON:-python3}"
device="${DEVICE:-cuda}"
rnmt() { "$py" -m rnmt_cli.main "$@"; }
work="${WORK:-/tmp/rnmt-gpu}"
{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || echo "no GPU"; } | tee "$out/gpu.txt"
"$py" -c "import torch, sentencepiece, sacrebleu, typer; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"

"$py" "$root/benchmarks/reference_spm.py" --multi30k "$m30k" --out "$work/spm"
rnmt preprocess -s de -t en --train "$work/spm/raw/train" --valid "$work/spm/raw/val" \
    --test "$work/spm/raw/test" --spm-model "$work/spm/spm.model" --out "$work/bin" 2>&1 | tail -3
"$py" "$root/benchmarks/train_speed.py" "$work/bin" --device "$device" --batches "${SPEED_BATCHES:-50}" --warmup 5 \
    | tee "$out/train_speed.txt"
rnmt train "$work/bin" --save-dir "$work/run" --device "$device" --max-time "$minutes" \
    --max-epochs 1000 --log-every 200 2>&1 | tee "$out/train.log" | grep -E "valid|done|model"
for beam in 1 5; do
    start=$(date +%s%N)
    rnmt translate -m "$work/run/best.pt" --beam "$beam" --batch-size 64 --device "$device" \
        < "$work/spm/raw/test.de" > "$out/test.b$beam.en"
    end=$(date +%s%N)
    echo "beam $beam: whole process $(( (end - start) / 1000000 )) ms for 1000 sentences" | tee -a "$out/translate.txt"
    rnmt score --ref "$work/spm/raw/test.en" "$out/test.b$beam.en" | tee -a "$out/translate.txt"
done
