"""Train the reference benchmark's sentencepiece model exactly as ../shared/bench/prep_data.py
does (joint unigram, 8000 pieces, train.de + train.en of Multi30k, its own special ids), so
rnmt can be run on the peers' segmentation with `rnmt preprocess --spm-model` even where the
peers are not installed.

Usage: python benchmarks/reference_spm.py [--multi30k DIR] --out DIR
Writes DIR/spm.model and DIR/raw/{train,val,test}.{de,en} (plain text, as prep_data.py).
"""

from __future__ import annotations

import argparse
import gzip
from pathlib import Path

import sentencepiece as spm

SPLITS = {"train": "train", "val": "val", "test": "test_2016_flickr"}
LANGS = ("de", "en")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--multi30k", type=Path,
                        default=Path(__file__).resolve().parents[2] / "shared/data/multi30k")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--vocab-size", type=int, default=8000)
    args = parser.parse_args()
    raw = args.out / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for split, name in SPLITS.items():
        for lang in LANGS:
            with gzip.open(args.multi30k / f"{name}.{lang}.gz", "rt", encoding="utf-8") as f:
                lines = [line.rstrip("\n") for line in f]
            (raw / f"{split}.{lang}").write_text("\n".join(lines) + "\n", encoding="utf-8")
    prefix = args.out / "spm"
    if not prefix.with_suffix(".model").exists():
        spm.SentencePieceTrainer.train(
            input=",".join(str(raw / f"train.{lang}") for lang in LANGS),
            model_prefix=str(prefix), vocab_size=args.vocab_size, model_type="unigram",
            character_coverage=1.0, input_sentence_size=0, shuffle_input_sentence=False,
            num_threads=2, seed_sentencepiece_size=1000000, minloglevel=1,
            bos_id=-1, eos_id=-1, unk_id=0, pad_id=-1,
        )
    print(f"{prefix}.model and {raw}/")


if __name__ == "__main__":
    main()
