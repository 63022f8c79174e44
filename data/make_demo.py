"""Generate the embedded demo corpus: English number expressions -> German ones.

The task is small enough to train in minutes on a CPU, yet it is not a
word-by-word copy: German says the units before the tens and glues the whole
number into one word ("four hundred twenty-one" -> "vierhunderteinundzwanzig"),
so a model must learn to reorder and to segment.  Some numbers are wrapped in
short template sentences, a few of which also move the number and the verb
around (German verb-final subordinate clauses, participles at the end).

The numbers of the train, valid and test splits are disjoint: the number set is
split first and the sentences are generated afterwards, so a test score measures
generalisation to unseen numbers rather than memorisation.

Both verbalisers below are written out by hand, so the generator needs only the
standard library.  They match ``num2words`` (lang "en" with " and" and commas
removed, lang "de") on 1..9999; the test suite checks that where num2words is
installed.  Above 9999 we keep our own forms on purpose: num2words writes
101000 as "einhunderteinstausend" where German says "einhunderteintausend".

Usage::

    python data/make_demo.py --out data/demo [--seed 1] [--train 12000]
        [--valid 300] [--test 300] [--max-number 9999] [--template-prob 0.3]
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path
from typing import NamedTuple

MAX_SUPPORTED = 999_999

# --------------------------------------------------------------------------- #
# English: US style, "one thousand two hundred five", hyphen inside 21..99.
# --------------------------------------------------------------------------- #
_EN_UNITS = [
    "", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
    "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen",
    "seventeen", "eighteen", "nineteen",
]
_EN_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def _en_below_1000(n: int) -> list[str]:
    """Words for 1 <= n <= 999 (empty list for 0)."""
    words: list[str] = []
    hundreds, rest = divmod(n, 100)
    if hundreds:
        words += [_EN_UNITS[hundreds], "hundred"]
    if rest >= 20:
        tens, units = divmod(rest, 10)
        words.append(_EN_TENS[tens] + (f"-{_EN_UNITS[units]}" if units else ""))
    elif rest:
        words.append(_EN_UNITS[rest])
    return words


def verbalise_en(n: int) -> str:
    """Spell out ``n`` in English, e.g. 1205 -> "one thousand two hundred five"."""
    _check_range(n)
    thousands, rest = divmod(n, 1000)
    words = (_en_below_1000(thousands) + ["thousand"]) if thousands else []
    return " ".join(words + _en_below_1000(rest))


# --------------------------------------------------------------------------- #
# German: one lowercase word, units before tens ("einundzwanzig"), an explicit
# "ein" before hundert/tausend (the form num2words uses), and "eins" only when
# the number ends in a bare one ("eins", "hunderteins" but "einundzwanzig").
# --------------------------------------------------------------------------- #
_DE_UNITS = [
    "", "ein", "zwei", "drei", "vier", "fünf", "sechs", "sieben", "acht", "neun",
    "zehn", "elf", "zwölf", "dreizehn", "vierzehn", "fünfzehn", "sechzehn",
    "siebzehn", "achtzehn", "neunzehn",
]
_DE_TENS = ["", "", "zwanzig", "dreißig", "vierzig", "fünfzig", "sechzig", "siebzig", "achtzig", "neunzig"]


def _de_below_1000(n: int, word_final: bool) -> str:
    """One word for 0 <= n <= 999.

    ``word_final`` says whether nothing follows (then a trailing 1 is "eins");
    as a multiplier of "tausend" it stays "ein" ("einundzwanzigtausend").
    """
    hundreds, rest = divmod(n, 100)
    word = f"{_DE_UNITS[hundreds]}hundert" if hundreds else ""
    if rest >= 20:
        tens, units = divmod(rest, 10)
        word += (f"{_DE_UNITS[units]}und" if units else "") + _DE_TENS[tens]
    elif rest == 1 and word_final:
        word += "eins"
    else:
        word += _DE_UNITS[rest]
    return word


def verbalise_de(n: int) -> str:
    """Spell out ``n`` in German, e.g. 421 -> "vierhunderteinundzwanzig"."""
    _check_range(n)
    thousands, rest = divmod(n, 1000)
    prefix = f"{_de_below_1000(thousands, word_final=False)}tausend" if thousands else ""
    return prefix + _de_below_1000(rest, word_final=True)


def _check_range(n: int) -> None:
    if not 1 <= n <= MAX_SUPPORTED:
        raise ValueError(f"can only verbalise 1..{MAX_SUPPORTED}, got {n}")


# --------------------------------------------------------------------------- #
# Templates: (english, german), "{n}" is replaced by the verbalised number.
# Nouns are plural, so templates are used for n >= 2 only (no agreement with 1).
# --------------------------------------------------------------------------- #
TEMPLATES: list[tuple[str, str]] = [
    ("i have {n} apples .", "ich habe {n} äpfel ."),
    ("the train leaves from platform {n} .", "der zug fährt von gleis {n} ."),
    ("the house has {n} windows .", "das haus hat {n} fenster ."),
    ("the book costs {n} euros .", "das buch kostet {n} euro ."),
    ("the room is {n} meters long .", "das zimmer ist {n} meter lang ."),
    # Participle goes to the end in German.
    ("we have read {n} books .", "wir haben {n} bücher gelesen ."),
    # Verb-second inversion after a fronted adverb, participle last.
    ("yesterday we sold {n} tickets .", "gestern haben wir {n} karten verkauft ."),
    # Subordinate clauses: verb-final in German.
    ("she says that he bought {n} books .", "sie sagt , dass er {n} bücher gekauft hat ."),
    ("he knows that the city has {n} houses .", "er weiß , dass die stadt {n} häuser hat ."),
    ("i think that she has seen {n} cars .", "ich glaube , dass sie {n} autos gesehen hat ."),
    # Fronted place phrase in German.
    ("there are {n} children in the school .", "in der schule sind {n} kinder ."),
]


class Example(NamedTuple):
    """One parallel sentence pair and the number it verbalises."""

    number: int
    en: str
    de: str


SPLITS = ("train", "valid", "test")


def split_numbers(
    rng: random.Random, max_number: int, n_valid: int, n_test: int
) -> dict[str, list[int]]:
    """Partition 1..max_number into disjoint train/valid/test number sets.

    Valid and test each get one distinct number per sentence; train keeps
    all the rest, so it sees as many different numbers as possible.
    """
    if not 1 <= max_number <= MAX_SUPPORTED:
        raise ValueError(f"--max-number must be in 1..{MAX_SUPPORTED}, got {max_number}")
    if n_valid + n_test >= max_number:
        raise ValueError(
            f"valid+test ({n_valid}+{n_test}) must leave numbers for train out of {max_number}"
        )
    numbers = list(range(1, max_number + 1))
    rng.shuffle(numbers)
    return {
        "valid": sorted(numbers[:n_valid]),
        "test": sorted(numbers[n_valid : n_valid + n_test]),
        "train": sorted(numbers[n_valid + n_test :]),
    }


def _choose_numbers(rng: random.Random, pool: list[int], count: int) -> list[int]:
    """``count`` numbers from ``pool``: each once before any repeats."""
    if count <= len(pool):
        return rng.sample(pool, count)
    extra = [rng.choice(pool) for _ in range(count - len(pool))]
    chosen = pool + extra
    rng.shuffle(chosen)
    return chosen


def make_example(rng: random.Random, number: int, template_prob: float) -> Example:
    """Verbalise ``number``, wrapped in a random template with ``template_prob``."""
    en, de = verbalise_en(number), verbalise_de(number)
    # Draw unconditionally so the random stream does not depend on ``number``.
    wrap = rng.random() < template_prob
    template_en, template_de = rng.choice(TEMPLATES)
    if wrap and number >= 2:
        en, de = template_en.format(n=en), template_de.format(n=de)
    return Example(number, en, de)


def generate_examples(
    seed: int = 1,
    n_train: int = 12000,
    n_valid: int = 300,
    n_test: int = 300,
    max_number: int = 9999,
    template_prob: float = 0.3,
) -> dict[str, list[Example]]:
    """The corpus with the number behind every pair, keyed by split name."""
    if not 0.0 <= template_prob <= 1.0:
        raise ValueError(f"--template-prob must be in [0, 1], got {template_prob}")
    rng = random.Random(seed)
    pools = split_numbers(rng, max_number, n_valid, n_test)
    sizes = {"train": n_train, "valid": n_valid, "test": n_test}
    return {
        split: [
            make_example(rng, number, template_prob)
            for number in _choose_numbers(rng, pools[split], sizes[split])
        ]
        for split in SPLITS
    }


def generate(
    seed: int = 1,
    n_train: int = 12000,
    n_valid: int = 300,
    n_test: int = 300,
    max_number: int = 9999,
    template_prob: float = 0.3,
) -> dict[str, list[tuple[str, str]]]:
    """The corpus as (english, german) pairs, keyed by "train"/"valid"/"test"."""
    examples = generate_examples(seed, n_train, n_valid, n_test, max_number, template_prob)
    return {split: [(ex.en, ex.de) for ex in items] for split, items in examples.items()}


def write_corpus(corpus: dict[str, list[tuple[str, str]]], out_dir: Path) -> None:
    """Write ``{split}.en`` / ``{split}.de`` files, one sentence per line."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, pairs in corpus.items():
        for lang, column in (("en", 0), ("de", 1)):
            lines = "".join(pair[column] + "\n" for pair in pairs)
            (out_dir / f"{split}.{lang}").write_text(lines, encoding="utf-8", newline="\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--train", type=int, default=12000, help="train sentence pairs")
    parser.add_argument("--valid", type=int, default=300, help="valid sentence pairs")
    parser.add_argument("--test", type=int, default=300, help="test sentence pairs")
    parser.add_argument("--max-number", type=int, default=9999, help="numbers are 1..N")
    parser.add_argument("--template-prob", type=float, default=0.3,
                        help="probability of wrapping a number in a sentence")
    args = parser.parse_args(argv)
    if min(args.train, args.valid, args.test) < 0:
        parser.error("split sizes must be non-negative")
    try:
        corpus = generate(args.seed, args.train, args.valid, args.test,
                          args.max_number, args.template_prob)
    except ValueError as err:
        parser.error(str(err))
    write_corpus(corpus, args.out)
    print(
        f"wrote {args.train}/{args.valid}/{args.test} train/valid/test pairs "
        f"(numbers 1..{args.max_number}, seed {args.seed}, "
        f"template-prob {args.template_prob}) to {args.out}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
