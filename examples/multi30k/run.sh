#!/usr/bin/env bash
# Multi30k task 1 recipe: prepare -> preprocess -> train -> translate -> score.
#
# Usage: examples/multi30k/run.sh SRC TGT [CONFIG] [MINUTES] [DEVICE]
#   SRC-TGT one of de-en, en-de, en-fr, fr-en; CONFIG reference (default) or best;
#   MINUTES of training (default 15); DEVICE auto|cpu|cuda. With the best config (TUNE=1,
#   the default) the checkpoint (best or average of the last 5) and length penalty are
#   chosen on val. RESUME=1 continues an earlier run of the same pair and config up to
#   MINUTES of training in all.
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
[ -n "${RESUME:-}" ] && [ -d "$out/bin" ] || "$rnmt" preprocess -s "$src" -t "$tgt" --train "$data/raw/train" --valid "$data/raw/val" \
    --test "$data/raw/test_2016_flickr" --vocab-size 8000 --out "$out/bin"
"$rnmt" train "$out/bin" --save-dir "$out/run" --config "$here/$config.toml" \
    --max-time "$minutes" --device "$device" ${RESUME:+--resume} 2> >(tee "$out/train.log" >&2)

bleu() {  # bleu HYP REF: sacreBLEU of HYP against REF, two decimals
    "$rnmt" score --ref "$2" "$1" --json \
        | "$python" -c "import json,sys; print(round(json.load(sys.stdin)['bleu']['score'], 2))"
}

# The best configuration picks on val (never on test) between the best checkpoint and the
# average of the last 5 (fairseq's average_checkpoints), and the GNMT length penalty.
model="$out/run/best.pt"; alpha=1.0
if [ "$config" = best ] && [ "${TUNE:-1}" = 1 ]; then
    "$rnmt" average --last 5 --save-dir "$out/run" -o "$out/average.pt" >&2 || true
    echo -e "checkpoint\tlength_penalty\tval_BLEU" > "$out/tuning.tsv"
    top=-1
    for ckpt in "$out/run/best.pt" "$out/average.pt"; do
        [ -f "$ckpt" ] || continue
        for a in 0.6 1.0 1.4; do
            "$rnmt" translate -m "$ckpt" --beam 5 --length-penalty "$a" --device "$device" \
                < "$data/raw/val.$src" > "$out/val.hyp.$tgt"
            score="$(bleu "$out/val.hyp.$tgt" "$data/raw/val.$tgt")"
            echo -e "$(basename "$ckpt")\t$a\t$score" >> "$out/tuning.tsv"
            if "$python" -c "import sys; sys.exit(not $score > $top)"; then
                top="$score"; model="$ckpt"; alpha="$a"
            fi
        done
    done
    cat "$out/tuning.tsv" >&2
fi

echo -e "test\tBLEU\tchrF\tsignature\tcheckpoint\tlength_penalty" > "$out/results.tsv"
for test in test_2016_flickr test_2017_flickr; do
    "$rnmt" translate -m "$model" --beam 5 --length-penalty "$alpha" --device "$device" \
        < "$data/raw/$test.$src" > "$out/$test.hyp.$tgt"
    "$rnmt" score --ref "$data/raw/$test.$tgt" "$out/$test.hyp.$tgt" --json \
        | "$python" -c "import json,sys; d=json.load(sys.stdin); print('$test', round(d['bleu']['score'],2), round(d['chrf']['score'],2), d['bleu']['signature'], '$(basename "$model")', $alpha, sep='\t')" \
        >> "$out/results.tsv"
done
cat "$out/results.tsv"
