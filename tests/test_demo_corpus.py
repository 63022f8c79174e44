"""Tests for the demo corpus generator in data/make_demo.py (not a package, so loaded by path)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "data" / "make_demo.py"


def _load_module():
    spec = importlib.util.spec_from_file_location("make_demo", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # NamedTuple needs the module registered
    spec.loader.exec_module(module)
    return module


demo = _load_module()

SMALL = dict(n_train=400, n_valid=50, n_test=50, max_number=999, template_prob=0.5)


@pytest.mark.parametrize(
    ("n", "en", "de"),
    [
        (1, "one", "eins"),
        (21, "twenty-one", "einundzwanzig"),
        (100, "one hundred", "einhundert"),
        (101, "one hundred one", "einhunderteins"),
        (421, "four hundred twenty-one", "vierhunderteinundzwanzig"),
        (1000, "one thousand", "eintausend"),
        (1001, "one thousand one", "eintausendeins"),
        (1205, "one thousand two hundred five", "eintausendzweihundertfünf"),
        (9999, "nine thousand nine hundred ninety-nine", "neuntausendneunhundertneunundneunzig"),
        (21000, "twenty-one thousand", "einundzwanzigtausend"),
        (101000, "one hundred one thousand", "einhunderteintausend"),
    ],
)
def test_known_verbalisations(n: int, en: str, de: str) -> None:
    assert demo.verbalise_en(n) == en
    assert demo.verbalise_de(n) == de


@pytest.mark.parametrize("n", [0, -3, demo.MAX_SUPPORTED + 1])
def test_out_of_range_numbers_are_rejected(n: int) -> None:
    with pytest.raises(ValueError):
        demo.verbalise_en(n)
    with pytest.raises(ValueError):
        demo.verbalise_de(n)


def test_matches_num2words() -> None:
    num2words = pytest.importorskip("num2words").num2words
    for n in range(1, 10000):
        # num2words writes British "one hundred and one" and "one thousand, two ...".
        expected_en = num2words(n, lang="en").replace(",", "").replace(" and", "")
        assert demo.verbalise_en(n) == expected_en, n
        assert demo.verbalise_de(n) == num2words(n, lang="de"), n


def test_same_seed_same_corpus_other_seed_differs() -> None:
    assert demo.generate(seed=7, **SMALL) == demo.generate(seed=7, **SMALL)
    assert demo.generate(seed=7, **SMALL) != demo.generate(seed=8, **SMALL)


def test_generate_returns_requested_sizes_as_string_pairs() -> None:
    corpus = demo.generate(seed=3, **SMALL)
    assert {split: len(pairs) for split, pairs in corpus.items()} == {
        "train": 400, "valid": 50, "test": 50,
    }
    examples = demo.generate_examples(seed=3, **SMALL)
    assert corpus == {s: [(ex.en, ex.de) for ex in items] for s, items in examples.items()}


def test_numbers_are_disjoint_across_splits() -> None:
    examples = demo.generate_examples(seed=5, **SMALL)
    numbers = {split: {ex.number for ex in items} for split, items in examples.items()}
    assert not numbers["train"] & numbers["valid"]
    assert not numbers["train"] & numbers["test"]
    assert not numbers["valid"] & numbers["test"]
    # Valid/test use each of their numbers once; so does train while it has fewer
    # sentences than numbers.
    assert len(numbers["valid"]) == 50 and len(numbers["test"]) == 50
    assert len(numbers["train"]) == 400


def test_large_train_split_covers_every_remaining_number() -> None:
    examples = demo.generate_examples(seed=5, n_train=400, n_valid=20, n_test=20,
                                      max_number=300, template_prob=0.3)
    numbers = {split: {ex.number for ex in items} for split, items in examples.items()}
    assert len(examples["train"]) == 400
    assert numbers["train"] == set(range(1, 301)) - numbers["valid"] - numbers["test"]


def test_each_sentence_contains_its_number() -> None:
    """Ties the recorded numbers to the text, so the disjointness test means something."""
    examples = demo.generate_examples(seed=5, **SMALL)
    templated = 0
    for items in examples.values():
        for ex in items:
            en_number, de_number = demo.verbalise_en(ex.number), demo.verbalise_de(ex.number)
            if ex.en == en_number:
                assert ex.de == de_number
                continue
            templated += 1
            assert ex.number >= 2  # templates use plural nouns
            assert (ex.en, ex.de) in {
                (t_en.format(n=en_number), t_de.format(n=de_number))
                for t_en, t_de in demo.TEMPLATES
            }
    assert templated > 0


def test_no_templates_at_probability_zero() -> None:
    examples = demo.generate_examples(seed=2, **{**SMALL, "template_prob": 0.0})
    for items in examples.values():
        assert all(ex.en == demo.verbalise_en(ex.number) for ex in items)


def test_too_many_held_out_numbers_is_an_error() -> None:
    with pytest.raises(ValueError):
        demo.generate(seed=1, n_train=10, n_valid=50, n_test=50, max_number=100, template_prob=0.3)


def test_script_writes_parallel_files(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out), "--seed", "4",
         "--train", "120", "--valid", "20", "--test", "30", "--max-number", "500"],
        capture_output=True, text=True, check=True,
    )
    assert result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1
    expected = demo.generate(seed=4, n_train=120, n_valid=20, n_test=30,
                             max_number=500, template_prob=0.3)
    for split, size in (("train", 120), ("valid", 20), ("test", 30)):
        raw_en = (out / f"{split}.en").read_bytes()
        raw_de = (out / f"{split}.de").read_bytes()
        assert b"\r" not in raw_en + raw_de
        en_lines = raw_en.decode("utf-8").splitlines()
        de_lines = raw_de.decode("utf-8").splitlines()
        assert len(en_lines) == len(de_lines) == size
        assert list(zip(en_lines, de_lines)) == expected[split]
