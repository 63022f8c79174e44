#!/usr/bin/env bash
# Multi30k task 1 recipe: prepare -> preprocess -> train -> translate -> score.
#
# Usage: examples/multi30k/run.sh SRC TGT [CONFIG] [MINUTES] [DEVICE]
#   SRC-TGT one of de-en, en-de, en-fr, fr-en; CONFIG reference (default) or best;
#   MINUTES of training (default 15); DEVICE auto|cpu|cuda. With the best config (TUNE=1,
#   the default) the checkpoint (best or average of the last 5) and length penalty are
#   chosen on val. RESUME=1 continues an earlier run of the same pair and config up to
#   MINUTES of training in all. MEMBERS=N trains N seeds (side by side, or one after the
#   other on DEVICE cpu, whose cores they would share) and chooses on val between each alone
#   and their ensemble (rnmt translate -m a.pt -m b.pt). Also, from the environment:
#   PRECISION=fp32|bf16|fp16 (training), STEPS=N (--max-steps: the budget in updates, not
#   only minutes), FINETUNE=N (after training, N more updates from each run's best.pt at
#   FINETUNE_LR, default a quarter of the config's rate: rnmt train --init-from, a fresh
#   optimizer; the fine-tuned best.pt is then the member's model), TRAIN_ARGS="--dropout 0.3"
#   (more rnmt train options for both phases, over the config's), MEMBER2_ARGS="--cell gru"
#   (options of member k alone, over those: members of other architectures, which share the
#   vocabulary and so still ensemble).
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
# MEMBERS=N trains N models side by side (seeds 1..N; member 1 in run/, member k in runK/)
# and translates with their ensemble, as one would on a GPU with room for several runs.
members="${MEMBERS:-1}"; runs=(); pids=()
# A run of this recipe is continued (RESUME=1) or trained anew over the earlier one.
again=--overwrite; [ -z "${RESUME:-}" ] || again=--resume
options=(--config "$here/$config.toml" --device "$device")
[ -z "${PRECISION:-}" ] || options+=(--precision "$PRECISION")
read -ra extra <<< "${TRAIN_ARGS:-}"; options+=("${extra[@]}")
budget=(--max-time "$minutes"); [ -z "${STEPS:-}" ] || budget+=(--max-steps "$STEPS")
# FINETUNE's default rate: a quarter of the config's, read as rnmt train reads the config.
[ -z "${FINETUNE:-}" ] || finetune_lr="${FINETUNE_LR:-$("$python" -c "import sys
from rnmt.run_config import load_run_config
print(load_run_config(sys.argv[1])['lr'] / 4)" "$here/$config.toml")}"
member() {  # member K RUN: train seed K into RUN, then (FINETUNE=N) fine-tune it into RUN-ft
    local k="$1" run="$2" log="$out/train.log" tuned="$2-ft" own="MEMBER${1}_ARGS" mine
    [ "$k" = 1 ] || log="$out/train$k.log"
    read -ra mine <<< "${!own:-}"
    "$rnmt" train "$out/bin" --save-dir "$run" "${options[@]}" "${mine[@]}" "${budget[@]}" \
        --seed "$k" "$again" 2> >(tee "$log" >&2)
    [ -n "${FINETUNE:-}" ] || return 0
    # A lower-rate last phase, always anew from best.pt: with RESUME=1 the run it starts
    # from may have moved on.
    "$rnmt" train "$out/bin" --save-dir "$tuned" "${options[@]}" "${mine[@]}" \
        --lr "$finetune_lr" --max-steps "$FINETUNE" --seed "$((k + 100))" \
        --init-from "$run/best.pt" --overwrite 2> >(tee "${log%.log}.ft.log" >&2)
}
for k in $(seq 1 "$members"); do
    run="$out/run"; [ "$k" = 1 ] || run="$out/run$k"
    runs+=("$run"); [ -z "${FINETUNE:-}" ] || runs[-1]="$run-ft"
    if [ "$device" = cpu ]; then member "$k" "$run"; else member "$k" "$run" & pids+=($!); fi
done
for pid in "${pids[@]}"; do wait "$pid"; done

bleu() {  # bleu HYP REF: sacreBLEU of HYP against REF, two decimals
    "$rnmt" score --ref "$2" "$1" --json \
        | "$python" -c "import json,sys; print(round(json.load(sys.stdin)['bleu']['score'], 2))"
}
translate() {  # translate ALPHA INPUT OUTPUT CHECKPOINT...: beam 5, one model or an ensemble
    local alpha="$1" input="$2" output="$3"; shift 3
    local models=(); for checkpoint in "$@"; do models+=(-m "$checkpoint"); done
    "$rnmt" translate "${models[@]}" --beam 5 --length-penalty "$alpha" --device "$device" \
        < "$input" > "$output"
}

# The best configuration picks on val (never on test) the system and the GNMT length
# penalty: one run's best checkpoint or the average of its last 5 (fairseq's
# average_checkpoints); with MEMBERS > 1, each member alone (α 1.0) or the ensemble of all.
model=(); for run in "${runs[@]}"; do model+=("$run/best.pt"); done
system="best.pt"; [ "$members" = 1 ] || system="ensemble-of-$members"; alpha=1.0
if [ "$config" = best ] && [ "${TUNE:-1}" = 1 ]; then
    candidates=()  # "label<TAB>checkpoint<TAB>..." each (tabs: paths may hold spaces)
    if [ "$members" = 1 ]; then
        "$rnmt" average --last 5 --save-dir "${runs[0]}" -o "$out/average.pt" >&2 || true
        candidates+=("best.pt"$'\t'"${runs[0]}/best.pt")
        [ -f "$out/average.pt" ] && candidates+=("average.pt"$'\t'"$out/average.pt")
    else
        for run in "${runs[@]}"; do candidates+=("$(basename "$run")/best.pt"$'\t'"$run/best.pt"); done
        candidates+=("$system$(printf '\t%s' "${model[@]}")")
    fi
    echo -e "system\tlength_penalty\tval_BLEU" > "$out/tuning.tsv"
    top=-1
    for candidate in "${candidates[@]}"; do
        IFS=$'\t' read -ra words <<< "$candidate"; label="${words[0]}"; paths=("${words[@]:1}")
        alphas=(0.6 1.0 1.4); [ "$members" = 1 ] || [ "${#paths[@]}" -gt 1 ] || alphas=(1.0)
        for a in "${alphas[@]}"; do
            translate "$a" "$data/raw/val.$src" "$out/val.hyp.$tgt" "${paths[@]}"
            score="$(bleu "$out/val.hyp.$tgt" "$data/raw/val.$tgt")"
            echo -e "$label\t$a\t$score" >> "$out/tuning.tsv"
            if "$python" -c "import sys; sys.exit(not $score > $top)"; then
                top="$score"; model=("${paths[@]}"); alpha="$a"; system="$label"
            fi
        done
    done
    cat "$out/tuning.tsv" >&2
fi

echo -e "test\tBLEU\tchrF\tsignature\tsystem\tlength_penalty" > "$out/results.tsv"
for test in test_2016_flickr test_2017_flickr; do
    translate "$alpha" "$data/raw/$test.$src" "$out/$test.hyp.$tgt" "${model[@]}"
    "$rnmt" score --ref "$data/raw/$test.$tgt" "$out/$test.hyp.$tgt" --json \
        | "$python" -c "import json,sys; d=json.load(sys.stdin); print('$test', round(d['bleu']['score'],2), round(d['chrf']['score'],2), d['bleu']['signature'], '$system', $alpha, sep='\t')" \
        >> "$out/results.tsv"
done
cat "$out/results.tsv"
