#!/usr/bin/env bash
# The embedded demo: English number words -> German number words, end to end.
#   generate corpus -> rnmt preprocess -> rnmt train -> rnmt translate -> rnmt score
# Usage: data/demo.sh [WORKDIR]   (make demo sets RNMT and PYTHON to the venv's)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
work="${1:-demo}"
rnmt="${RNMT:-rnmt}"
python="${PYTHON:-python3}"
mkdir -p "$work"
start=$(date +%s)

"$python" "$here/make_demo.py" --out "$work/corpus"
"$rnmt" preprocess -s en -t de --train "$work/corpus/train" --valid "$work/corpus/valid" \
    --test "$work/corpus/test" --out "$work/bin" --vocab-size 1000
# --overwrite: running the demo again retrains from scratch into the same folder
"$rnmt" train "$work/bin" --save-dir "$work/model" --overwrite --emb-dim 128 --hidden-dim 128 \
    --dec-hidden-dim 256 --attn-dim 128 --output-dim 256 --dropout 0.1 \
    --max-tokens 1500 --lr 0.003 --max-epochs 7 --max-time 3 --threads 2 --log-every 100
"$rnmt" translate -m "$work/model/best.pt" --beam 5 --threads 2 \
    < "$work/corpus/test.en" > "$work/test.hyp.de"
"$rnmt" score --ref "$work/corpus/test.de" "$work/test.hyp.de"

echo
echo "Sample translations (source | rnmt | reference):"
# head on each file, not on the pipe: with pipefail, paste killed by SIGPIPE failed the demo
paste -d '|' <(head -n 8 "$work/corpus/test.en") <(head -n 8 "$work/test.hyp.de") \
    <(head -n 8 "$work/corpus/test.de") | sed 's/|/  |  /g'
echo
paste "$work/test.hyp.de" "$work/corpus/test.de" | awk -F'\t' \
    '{ n++; if ($1 == $2) same++ } END { printf "exact-match accuracy: %.1f%% (%d/%d)\n", 100*same/n, same, n }'
echo "demo finished in $(( $(date +%s) - start )) s; outputs in $work/"
