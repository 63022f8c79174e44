#!/usr/bin/env bash
# Multi30k task 1 recipe: prepare -> preprocess -> train -> translate -> score.
#
# Usage: examples/multi30k/run.sh SRC TGT [CONFIG] [MINUTES] [DEVICE]
#   SRC-TGT one of de-en, en-de, en-fr, fr-en; CONFIG reference (default) or best;
#   MINUTES of training (default 15); DEVICE auto|cpu|cuda.
# Data: $MULTI30K (default ../shared/data/multi30k) through prepare.py --from, which checks
# every file's checksum. Output: work/multi30k/SRC-TGT-CONFIG/ with results.tsv.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
src="$1"; tgt="$2"; config="${3:-reference}"; minutes="${4:-15}"; device="${5:-auto}"
rnmt="${RNMT:-$root/.venv/bin/rnmt}"; python="${PYTHON:-$root/.venv/bin/python}"
data="$root/work/multi30k"; out="$data/$src-$tgt-$config"
mkdir -p "$out"

[ -f "$data/raw/train.$src" ] || "$python" "$here/prepare.py" \
    --from "${MULTI30K:-$root/../shared/data/multi30k}" --out "$data"
"$rnmt" preprocess -s "$src" -t "$tgt" --train "$data/raw/train" --valid "$data/raw/val" \
    --test "$data/raw/test_2016_flickr" --vocab-size 8000 --out "$out/bin"
"$rnmt" train "$out/bin" --save-dir "$out/run" --config "$here/$config.toml" \
    --max-time "$minutes" --device "$device" 2> >(tee "$out/train.log" >&2)

echo -e "test\tBLEU\tchrF\tsignature" > "$out/results.tsv"
for test in test_2016_flickr test_2017_flickr; do
    "$rnmt" translate -m "$out/run/best.pt" --beam 5 --device "$device" \
        < "$data/raw/$test.$src" > "$out/$test.hyp.$tgt"
    "$rnmt" score --ref "$data/raw/$test.$tgt" "$out/$test.hyp.$tgt" --json \
        | "$python" -c "import json,sys; d=json.load(sys.stdin); print('$test', round(d['bleu']['score'],2), round(d['chrf']['score'],2), d['bleu']['signature'], sep='\t')" \
        >> "$out/results.tsv"
done
cat "$out/results.tsv"
