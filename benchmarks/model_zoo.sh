#!/usr/bin/env bash
# The model zoo on Multi30k de-en: every lecture model with the same sizes (the reference
# model's: emb 256, encoder 256 per direction, decoder 512) and the same training budget,
# then test_2016_flickr with beam 5 (batch 64) and sacreBLEU.
#
# Usage: benchmarks/model_zoo.sh MULTI30K_DIR OUT_DIR [MINUTES_EACH] [DEVICE]
# Runs from a source tree or an installed rnmt (the cli/ dir is put on the path as rnmt_cli).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
m30k="$1"; out="$2"; minutes="${3:-20}"; device="${4:-auto}"
mkdir -p "$out" /tmp/rnmt-shim
ln -sfn "$root/cli" /tmp/rnmt-shim/rnmt_cli
export PYTHONPATH="$root:/tmp/rnmt-shim${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py="${PYTHON:-python3}"
rnmt() { "$py" -m rnmt_cli.main "$@"; }
work="${WORK:-/tmp/rnmt-zoo}"

"$py" "$root/benchmarks/reference_spm.py" --multi30k "$m30k" --out "$work/spm" >/dev/null
rnmt preprocess -s de -t en --train "$work/spm/raw/train" --valid "$work/spm/raw/val" \
    --test "$work/spm/raw/test" --spm-model "$work/spm/spm.model" --out "$work/bin" 2>/dev/null

declare -A models=(
    [seq2seq]="--arch seq2seq"
    [seq2seq-reverse]="--arch seq2seq --reverse-source"
    [bahdanau-lstm]="--arch attention --attention bahdanau --cell lstm"
    [luong-general-feed]="--arch attention --attention general --input-feeding"
    [bahdanau-rnn]="--arch attention --attention bahdanau --cell rnn"
    [bahdanau-gru]="--arch attention --attention bahdanau --cell gru"
)
echo -e "model\tsteps\tbest_valid_ppl\tBLEU\tchrF\tflags" | tee "$out/zoo.tsv"
for name in seq2seq seq2seq-reverse bahdanau-lstm luong-general-feed bahdanau-rnn bahdanau-gru; do
    # shellcheck disable=SC2086
    rnmt train "$work/bin" --save-dir "$work/$name" --overwrite ${models[$name]} --max-time "$minutes" \
        --max-epochs 1000 --device "$device" --log-every 1000 > "$out/$name.train.log" 2>&1
    rnmt translate -m "$work/$name/best.pt" --beam 5 --device "$device" \
        < "$work/spm/raw/test.de" > "$out/$name.test.en"
    scores=$(rnmt score --ref "$work/spm/raw/test.en" "$out/$name.test.en" --json)
    summary=$(grep "^done" "$out/$name.train.log" | tail -1)
    steps=$(echo "$summary" | grep -o "after [0-9]* steps" | grep -o "[0-9]*")
    ppl=$(echo "$summary" | grep -o "best valid ppl [0-9.]*" | grep -o "[0-9.]*$")
    bleu=$("$py" -c "import json,sys; d=json.loads(sys.argv[1]); print(round(d['bleu']['score'],2), round(d['chrf']['score'],2), sep='\t')" "$scores")
    echo -e "$name\t$steps\t$ppl\t$bleu\t${models[$name]}" | tee -a "$out/zoo.tsv"
done
