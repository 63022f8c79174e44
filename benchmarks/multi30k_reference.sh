#!/usr/bin/env bash
# The reference benchmark of ../shared/bench/README.md, run with rnmt alone:
# Multi30k de->en, the peers' sentencepiece model (joint unigram 8000, rebuilt identically),
# the reference model (emb 256, biLSTM 256/dir, LSTM decoder 512, Bahdanau attention,
# dropout 0.2, Adam 1e-3, clip 5, 3000-token batches), MINUTES of CPU training on 2 threads,
# then test_2016_flickr with beam 5 and greedy (batch 64), sacreBLEU 13a cased.
#
# Usage: benchmarks/multi30k_reference.sh [WORKDIR] [MINUTES]   (defaults: work/m30k 15)
# Needs the venv (`make install`); reads ../shared/data/multi30k or $MULTI30K.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
work="${1:-$root/work/m30k}"
minutes="${2:-15}"
m30k="${MULTI30K:-$root/../shared/data/multi30k}"
bin="$root/.venv/bin"
export OMP_NUM_THREADS=2 MKL_NUM_THREADS=2
mkdir -p "$work"

"$bin/python" "$root/benchmarks/reference_spm.py" --multi30k "$m30k" --out "$work/spm"
"$bin/rnmt" preprocess -s de -t en --train "$work/spm/raw/train" --valid "$work/spm/raw/val" \
    --test "$work/spm/raw/test" --spm-model "$work/spm/spm.model" --out "$work/bin"
/usr/bin/time -v -o "$work/train.time" "$bin/rnmt" train "$work/bin" --save-dir "$work/run" --overwrite \
    --max-time "$minutes" --max-epochs 1000 --threads 2 --device cpu --log-every 50 \
    2> >(tee "$work/train.log" >&2)

for beam in 5 1; do
    out="$work/test.b$beam"
    /usr/bin/time -v -o "$out.time" "$bin/rnmt" translate -m "$work/run/last.pt" --beam "$beam" \
        --batch-size 64 --threads 2 --device cpu < "$work/spm/raw/test.de" > "$out.en"
    wall=$(awk '/Elapsed \(wall clock\)/ {print $NF}' "$out.time")
    rss=$(awk '/Maximum resident/ {print $NF}' "$out.time")
    echo "beam $beam: wall $wall, peak RSS ${rss} kB"
    "$bin/rnmt" score --ref "$work/spm/raw/test.en" "$out.en"
done
echo "training peak RSS: $(awk '/Maximum resident/ {print $NF}' "$work/train.time") kB"
