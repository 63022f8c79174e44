"""`rnmt score`: sacrebleu metrics, significance, by-length analysis and model scores."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import run_rnmt

SACREBLEU = str(Path(sys.executable).parent / "sacrebleu")

REFS = ["the cat sat on the mat .", "a dog runs in the park .", "Hello world , how are you ?",
        "we will meet again tomorrow morning .", "the weather is Nice today ."]
REFS2 = ["the cat is on the mat .", "the dog runs in a park .", "hello world , how are you ?",
         "we meet again tomorrow morning .", "the weather is nice today ."]
SYS_A = ["the cat sat on a mat .", "a dog runs in a park .", "hello there world , how are you",
         "we will meet tomorrow .", "weather is nice today"]
SYS_B = ["the cat on mat", "dog run park .", "hello world", "we meet again tomorrow morning .",
         "the weather is Nice today ."]
SOURCES = ["die Katze sitzt", "ein Hund läuft im Park " * 3, "hallo Welt",
           "wir " * 25, "das Wetter ist heute schön " * 3]


@pytest.fixture
def files(tmp_path) -> dict[str, Path]:
    paths = {}
    for name, lines in (("ref", REFS), ("ref2", REFS2), ("a", SYS_A), ("b", SYS_B),
                        ("src", SOURCES)):
        paths[name] = tmp_path / f"{name}.txt"
        paths[name].write_text("".join(line + "\n" for line in lines), "utf-8")
    return paths


def sacrebleu_json(*args: str) -> dict[str, dict]:
    out = subprocess.run([SACREBLEU, *args, "-f", "json", "-w", "6"], capture_output=True,
                         check=True, text=True).stdout
    entries = json.loads(out)
    return {entry["name"]: entry for entry in (entries if isinstance(entries, list) else [entries])}


def app():
    from rnmt_cli.main import app

    return app


@dataclass
class Outcome:
    returncode: int
    stdout: bytes
    stderr: bytes


def rnmt(*args: str, check: bool = False) -> Outcome:
    """The CLI in-process (no torch start-up per call); exit codes as a user sees them."""
    result = CliRunner().invoke(app(), list(args))
    outcome = Outcome(result.exit_code, result.stdout_bytes, result.stderr_bytes)
    if check and outcome.returncode != 0:
        raise AssertionError(f"rnmt {' '.join(args)} failed ({outcome.returncode}):\n"
                             f"{outcome.stderr.decode()}{result.exception!r}")
    return outcome


def one_line_error(result: subprocess.CompletedProcess | Outcome) -> str:
    assert result.returncode == 2, result.stderr.decode()
    err = result.stderr.decode().strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


# --- metrics ---------------------------------------------------------------------------


def test_bleu_chrfpp_ter_with_two_references_equal_the_sacrebleu_command(files):
    ours = json.loads(rnmt(
        "score", "--ref", str(files["ref"]), "--ref", str(files["ref2"]), str(files["a"]),
        "--metrics", "bleu,chrf,ter", "--chrf-word-order", "2", "--json", check=True).stdout)
    theirs = sacrebleu_json(str(files["ref"]), str(files["ref2"]), "-i", str(files["a"]),
                            "-m", "bleu", "chrf", "ter", "--chrf-word-order", "2")
    assert set(ours) == {"bleu", "chrf", "ter"}
    for key, name in (("bleu", "BLEU"), ("chrf", "chrF2++"), ("ter", "TER")):
        assert ours[key]["name"] == name
        assert ours[key]["score"] == pytest.approx(theirs[name]["score"], abs=1e-4)
        assert ours[key]["signature"] == theirs[name]["signature"]
    assert "nrefs:2" in ours["bleu"]["signature"] and "nw:2" in ours["chrf"]["signature"]


def test_metric_names_are_read_in_any_case_and_each_reported_once(files):
    out = rnmt("score", "--ref", str(files["ref"]), str(files["a"]), "--metrics",
               "BLEU, chrF,bleu", check=True).stdout.decode().splitlines()
    assert [line.split()[0] for line in out] == ["BLEU", "chrF2"]


def test_tokenize_and_lowercase_reach_sacrebleu(files):
    ours = json.loads(rnmt(
        "score", "--ref", str(files["ref"]), str(files["b"]), "--tokenize", "char",
        "--lowercase", "--json", check=True).stdout)
    theirs = sacrebleu_json(str(files["ref"]), "-i", str(files["b"]), "-m", "bleu", "chrf",
                            "-tok", "char", "-lc", "--chrf-lowercase")
    assert ours["bleu"]["score"] == pytest.approx(theirs["BLEU"]["score"], abs=1e-4)
    assert ours["chrf"]["score"] == pytest.approx(theirs["chrF2"]["score"], abs=1e-4)
    assert "tok:char" in ours["bleu"]["signature"] and "case:lc" in ours["bleu"]["signature"]
    cased = json.loads(rnmt("score", "--ref", str(files["ref"]), str(files["b"]),
                                "--json", check=True).stdout)
    assert cased["bleu"]["score"] != ours["bleu"]["score"]


def test_several_systems_print_one_row_each_when_piped(files):
    out = rnmt("score", "--ref", str(files["ref"]), str(files["a"]), str(files["b"]),
                   check=True).stdout.decode().splitlines()
    assert out[0].split("\t") == ["system", "BLEU", "chrF2"]
    rows = [line.split("\t") for line in out[1:3]]
    assert [r[0] for r in rows] == [str(files["a"]), str(files["b"])]
    theirs_b = sacrebleu_json(str(files["ref"]), "-i", str(files["b"]), "-m", "bleu")
    assert float(rows[1][1]) == pytest.approx(theirs_b["BLEU"]["score"], abs=0.01)
    assert any(line.startswith("BLEU\tnrefs:1|") for line in out)


def test_significance_p_values_equal_sacrebleu_paired_bootstrap(files):
    ours = json.loads(rnmt(
        "score", "--ref", str(files["ref"]), str(files["a"]), str(files["b"]),
        "--significance", "--bootstrap-samples", "500", "--json", check=True).stdout)
    text = subprocess.run(
        [SACREBLEU, str(files["ref"]), "-i", str(files["a"]), str(files["b"]), "-m", "bleu",
         "chrf", "--paired-bs", "--paired-bs-n", "500", "-w", "4", "-f", "text"],
        capture_output=True, check=True, text=True).stdout
    p_values = [float(p) for p in re.findall(r"\(p = ([0-9.]+)\)", text)]
    baseline, system = ours["systems"]
    assert baseline["bleu"]["p_value"] is None
    assert [system["bleu"]["p_value"], system["chrf"]["p_value"]] == pytest.approx(
        p_values, abs=1e-4)
    assert system["bleu"]["differs"] == (system["bleu"]["p_value"] < 0.05)
    assert "bs:500" in system["bleu"]["signature"]


def test_by_length_scores_each_bucket_of_sentences_alone(files):
    from sacrebleu.metrics import BLEU, CHRF

    report = json.loads(rnmt(
        "score", "--ref", str(files["ref"]), str(files["a"]), str(files["b"]),
        "--src", str(files["src"]), "--by-length", "--json", check=True).stdout)["by_length"]
    assert [b["label"] for b in report["buckets"]] == ["0-10", "10-20", "20-30", "30+"]
    # source words: 3, 15, 2, 25, 15
    assert [b["sentences"] for b in report["buckets"]] == [2, 2, 1, 0]
    for s, hyps in enumerate((SYS_A, SYS_B)):
        for b, members in enumerate(([0, 2], [1, 4], [3])):
            h = [hyps[i] for i in members]
            r = [[REFS[i] for i in members]]
            assert report["scores"]["bleu"]["by_system"][s][b] == pytest.approx(
                BLEU().corpus_score(h, r).score, abs=1e-3)
            assert report["scores"]["chrf"]["by_system"][s][b] == pytest.approx(
                CHRF().corpus_score(h, r).score, abs=1e-3)
        assert report["scores"]["bleu"]["by_system"][s][3] is None


def test_buckets_option_chooses_the_boundaries(files):
    out = rnmt("score", "--ref", str(files["ref"]), str(files["a"]), "--src",
                   str(files["src"]), "--by-length", "--buckets", "5,20", check=True).stdout
    rows = [line.split("\t")[:2] for line in out.decode().splitlines()[1:4]]
    assert rows == [["0-5", "2"], ["5-20", "2"], ["20+", "1"]]


def test_plot_draws_a_png(files, tmp_path):
    pytest.importorskip("matplotlib")
    image = tmp_path / "len.png"
    rnmt("score", "--ref", str(files["ref"]), str(files["a"]), str(files["b"]), "--src",
             str(files["src"]), "--by-length", "--plot", str(image), check=True)
    assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The file named, even without a suffix (matplotlib wrote `len.png` beside it); the
    # suffix chooses the format; one it does not know is a one-line error.
    for name, magic in [("bylen", b"\x89PNG"), ("bylen.svg", b"<?xml"), ("bylen.PDF", b"%PDF")]:
        rnmt("score", "--ref", str(files["ref"]), str(files["a"]), "--src", str(files["src"]),
             "--by-length", "--plot", str(tmp_path / name), check=True)
        assert (tmp_path / name).read_bytes().startswith(magic), name
    assert not (tmp_path / "bylen.png").exists()
    result = rnmt("score", "--ref", str(files["ref"]), str(files["a"]), "--src",
                  str(files["src"]), "--by-length", "--plot", str(tmp_path / "len.xyz"))
    assert "--plot" in one_line_error(result) and "xyz" in one_line_error(result)


def test_plot_without_matplotlib_is_a_one_line_error(files, tmp_path, monkeypatch):
    # As on an install without the "plot" extra: importing matplotlib fails.
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    result = rnmt("score", "--ref", str(files["ref"]), str(files["a"]), "--src",
                  str(files["src"]), "--by-length", "--plot", str(tmp_path / "x.png"))
    assert "needs matplotlib" in one_line_error(result)
    assert not (tmp_path / "x.png").exists()


# --- errors ----------------------------------------------------------------------------


def test_empty_hypothesis_file_is_a_one_line_error(files, tmp_path):
    (tmp_path / "empty").write_text("")
    err = one_line_error(run_rnmt("score", "--ref", str(files["ref"]), str(tmp_path / "empty")))
    assert "empty" in err and "no hypotheses" in err


def test_reference_in_another_encoding_names_file_and_line(files, tmp_path):
    latin1 = tmp_path / "ref.latin1"
    latin1.write_bytes("the cat\nthe weather is schön\n".encode("latin-1"))
    (tmp_path / "hyp").write_text("the cat\nthe weather is nice\n")
    err = one_line_error(run_rnmt("score", "--ref", str(latin1), str(tmp_path / "hyp")))
    assert f"{latin1}: line 2: invalid UTF-8" in err


def test_second_system_with_other_line_count_names_both_files(files, tmp_path):
    (tmp_path / "short").write_text("one line\n")
    err = one_line_error(run_rnmt("score", "--ref", str(files["ref"]), str(files["a"]),
                                  str(tmp_path / "short")))
    assert "line counts differ" in err and "short has 1 lines" in err and "ref.txt has 5" in err


def test_source_with_other_line_count_is_an_error_for_by_length(files, tmp_path):
    (tmp_path / "src").write_text("eins\nzwei\n")
    err = one_line_error(rnmt("score", "--ref", str(files["ref"]), str(files["a"]),
                                  "--src", str(tmp_path / "src"), "--by-length"))
    assert "line counts differ" in err and "src has 2" in err


@pytest.mark.parametrize("args, message", [
    (["--metrics", "bleu,meteor"], "unknown metric meteor"),
    (["--by-length", "--buckets", "20,10"], "--buckets"),
    (["--by-length"], "needs the source"),
    (["--significance"], "at least two systems"),
    (["--tokenize", "klingon"], "unknown --tokenize"),
])
def test_bad_options_are_one_line_errors(files, args, message):
    src = ["--src", str(files["src"])] if "--buckets" in args else []
    err = one_line_error(rnmt("score", "--ref", str(files["ref"]), str(files["a"]),
                                  *src, *args))
    assert message in err


# --- model scores ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def scorer(trained_checkpoint):
    from rnmt.scoring import ForcedScorer

    return ForcedScorer.load(trained_checkpoint, device="cpu", batch_size=7)


@pytest.fixture(scope="module")
def pairs(corpus_dir) -> tuple[list[str], list[str]]:
    src = (corpus_dir / "test.en").read_text("utf-8").splitlines()[:20]
    tgt = (corpus_dir / "test.de").read_text("utf-8").splitlines()[:20]
    return src, tgt


def step_by_step_log_prob(loaded, source: str, target: str) -> tuple[float, int]:
    """log p(y | x) one decoder step at a time, as search computes it (not teacher forcing)."""
    from rnmt.data import pad_sentences
    from rnmt.vocab import BOS, EOS

    model = loaded.model
    src, lengths = pad_sentences(loaded.src_vocab.encode([source]), suffix=EOS)
    targets = [*loaded.tgt_vocab.encode([target])[0].tolist(), EOS]
    with torch.no_grad():
        enc = model.encode(src, lengths)
        state = model.init_state(enc)
        prev, total = BOS, 0.0
        for y in targets:
            log_probs, state, _ = model.step(torch.tensor([prev]), state, enc)
            total += float(log_probs[0, y])
            prev = y
    return total, len(targets)


def test_perplexity_is_exp_of_the_mean_nll_computed_step_by_step(scorer, pairs):
    from rnmt.scoring import perplexity

    src, tgt = pairs
    scores = scorer.score_lines(tgt, src)
    expected = [step_by_step_log_prob(scorer.loaded, s, t) for s, t in zip(src, tgt)]
    for got, (log_prob, n) in zip(scores, expected):
        assert got.tokens == n
        assert got.log_prob == pytest.approx(log_prob, abs=1e-4)
    nll = -sum(lp for lp, _ in expected) / sum(n for _, n in expected)
    assert perplexity(scores) == pytest.approx(math.exp(nll), rel=1e-5)


def test_forced_score_of_every_beam_hypothesis_equals_the_beam_score(scorer, pairs):
    from rnmt.data import pad_sentences
    from rnmt.scoring import score_ids
    from rnmt.search import SearchConfig, beam_search
    from rnmt.vocab import EOS

    model = scorer.loaded.model
    src_ids = scorer.loaded.src_vocab.encode(pairs[0][:8])
    src, lengths = pad_sentences(src_ids, suffix=EOS)
    finished = beam_search(model, src, lengths, SearchConfig(beam=3, length_penalty=1.0))
    sources = [src_ids[i] for i, hyps in enumerate(finished) for _ in hyps]
    hyps = [h for sentence in finished for h in sentence]
    forced = score_ids(model, sources, [np.array(h.tokens, dtype=np.int64) for h in hyps],
                       torch.device("cpu"), batch_size=5)
    assert len(hyps) == 8 * 3
    for hyp, got in zip(hyps, forced):
        assert got.log_prob == pytest.approx(hyp.score, abs=1e-4)
        assert got.tokens == len(hyp.tokens) + 1


def test_cli_prints_each_pairs_log_prob_and_the_corpus_perplexity(scorer, pairs, tmp_path,
                                                                 trained_checkpoint):
    from rnmt.scoring import perplexity

    src, tgt = pairs
    (tmp_path / "src").write_text("\n".join(src) + "\n")
    (tmp_path / "ref").write_text("\n".join(tgt) + "\n")
    result = run_rnmt("score", "-m", str(trained_checkpoint), "--src", str(tmp_path / "src"),
                      "--ref", str(tmp_path / "ref"), "--device", "cpu", check=True)
    rows = [line.split("\t") for line in result.stdout.decode().splitlines()]
    expected = scorer.score_lines(tgt, src)
    assert len(rows) == len(src)
    for row, s in zip(rows, expected):
        assert float(row[0]) == pytest.approx(s.log_prob, abs=1e-3)
        assert float(row[1]) == pytest.approx(s.per_token, abs=1e-3)
        assert int(row[2]) == s.tokens
    assert f"perplexity {perplexity(expected):.4f}" in result.stderr.decode()
    as_json = json.loads(rnmt("score", "-m", str(trained_checkpoint), "--src",
                                  str(tmp_path / "src"), "--ref", str(tmp_path / "ref"),
                                  "--device", "cpu", "--json", check=True).stdout)
    assert as_json["perplexity"] == pytest.approx(perplexity(expected), rel=1e-4)
    assert len(as_json["lines"]) == len(src)


def test_forced_decoding_rejects_mismatched_source(trained_checkpoint, tmp_path):
    (tmp_path / "src").write_text("one\ntwo\n")
    (tmp_path / "ref").write_text("eins\n")
    err = one_line_error(rnmt("score", "-m", str(trained_checkpoint), "--src",
                                  str(tmp_path / "src"), "--ref", str(tmp_path / "ref"),
                                  "--device", "cpu"))
    assert "line counts differ" in err


def test_nbest_rescoring_keeps_the_candidate_the_model_finds_most_probable(
        scorer, pairs, tmp_path, trained_checkpoint):
    src, tgt = pairs
    src = src[:6]
    # Candidates per sentence: its reference and two other sentences' references; the
    # n-best file's own scores rank them the other way round. Sentence 5 has none.
    candidates = []
    for i in range(5):
        for rank, j in enumerate((i, (i + 1) % 6, (i + 2) % 6)):
            candidates.append((i, float(rank), tgt[j]))
    nbest = tmp_path / "nbest"
    nbest.write_text("".join(f"{i}\t{s}\t{t}\n" for i, s, t in candidates))
    (tmp_path / "src").write_text("\n".join(src) + "\n")

    model_scores = scorer.score_lines([t for _, _, t in candidates],
                                      [src[i] for i, _, _ in candidates])
    by_model = [max((c for c in zip(candidates, model_scores) if c[0][0] == i),
                    key=lambda c: c[1].log_prob)[0][2] for i in range(5)]
    assert sum(b == tgt[i] for i, b in enumerate(by_model)) >= 4  # the model learned the task

    args = ["score", "-m", str(trained_checkpoint), "--src", str(tmp_path / "src"),
            "--nbest-rescore", str(nbest), "--device", "cpu"]
    out = rnmt(*args, check=True).stdout.decode().split("\n")
    assert out == [*by_model, "", ""]  # one line per source line, the last one empty
    # Two copies of the model, mean: the same ranking. A heavy weight on the n-best
    # scores: their ranking (the highest original score wins).
    out = rnmt(*args, "-m", str(trained_checkpoint), "--combine", "mean",
                   check=True).stdout.decode().split("\n")
    assert out == [*by_model, "", ""]
    out = rnmt(*args, "--nbest-weight", "1000", check=True).stdout.decode().split("\n")
    assert out == [tgt[(i + 2) % 6] for i in range(5)] + ["", ""]



@pytest.mark.parametrize("args, message", [
    (["--errors", "ignore", "--ref", "{ref}", "{a}"], "unknown --errors 'ignore'"),
    (["--nbest-rescore", "{nbest}"], "needs the model(s) to re-rank with (-m)"),
    (["{a}"], "give the reference(s) with --ref"),
    (["--ref", "{ref}", "{a}", "--plot", "{tmp}/p.png"], "add --by-length"),
    (["--ref", "{ref}", "{a}", "--src", "{src}", "--by-length", "--buckets", "ten,20"],
     "--buckets 'ten,20'"),
    (["-m", "{mt}", "--src", "{src}", "--ref", "{ref}", "--by-length"],
     "do not combine with -m"),
    (["-m", "{mt}", "-m", "{mt}", "--src", "{src}", "--ref", "{ref}"],
     "forced decoding scores with one model"),
    (["-m", "{mt}", "--src", "{src}", "--ref", "{ref}", "{a}"], "give one target text"),
    (["-m", "{mt}", "--ref", "{ref}"], "is a translation model: give the source with --src"),
    (["-m", "{lm}", "--src", "{src}", "--ref", "{ref}"], "is a language model"),
    (["-m", "{mt}", "--nbest-rescore", "{nbest}"], "needs the source (--src)"),
    (["-m", "{mt}", "--src", "{src}", "--nbest-rescore", "{nbest}", "--combine", "max"],
     "unknown --combine 'max'"),
    (["-m", "{mt}", "--src", "{src}", "--nbest-rescore", "{tmp}/bad"],
     "bad: line 1: expected 'index<TAB>score<TAB>text'"),
    (["-m", "{mt}", "--src", "{src}", "--nbest-rescore", "{tmp}/empty"], "no candidates"),
    (["-m", "{mt}", "--src", "{src}", "--nbest-rescore", "{tmp}/far"],
     "n-best index 7 is beyond the 5 input sentences"),
    (["-m", "{mt}", "--src", "{src}", "{tmp}/short"],
     "short has 1 lines"),
    (["-m", "{mt}", "--src", "{src}", "--ref", "{ref}", "--batch-size", "0"],
     "--batch-size must be at least 1"),
    (["-m", "{lm}", "{tmp}/empty"], "empty: no lines to score (empty input)"),
    # sacrebleu loops over the orders: this one ran for hours
    (["--ref", "{ref}", "{a}", "--chrf-word-order", "1000000000"],
     "--chrf-word-order must be between 0 and 6"),
])
def test_option_conflicts_are_one_line_errors(files, tmp_path, trained_checkpoint,
                                              lm_checkpoint, args, message):
    (tmp_path / "nbest").write_text("0\t-1.0\tthe cat\n")
    (tmp_path / "bad").write_text("x\tnot\ta score\n")
    (tmp_path / "empty").write_text("")
    (tmp_path / "far").write_text("7\t-1.0\tthe cat\n")
    (tmp_path / "short").write_text("the cat\n")
    names = {**{k: str(v) for k, v in files.items()}, "tmp": str(tmp_path),
             "nbest": str(tmp_path / "nbest"), "mt": str(trained_checkpoint),
             "lm": str(lm_checkpoint)}
    device = ["--device", "cpu"] if "-m" in args else []  # metrics alone would warn of it
    err = one_line_error(rnmt("score", *(a.format(**names) for a in args), *device))
    assert message in err


def test_options_another_mode_reads_are_named_in_a_warning(files, trained_checkpoint, tmp_path):
    """Each mode of `score` (metrics; model scores with -m; --nbest-rescore) names the
    options given for another, which it does not use, in one warning line; none when
    every option given is used."""
    def warnings(*args: str) -> list[str]:
        result = rnmt("score", *args, check=True)
        return [line for line in result.stderr.decode().splitlines() if "warning" in line]

    ref, a, src = str(files["ref"]), str(files["a"]), str(files["src"])
    assert warnings("--ref", ref, a, "--tokenize", "intl", "--lowercase") == []
    assert warnings("--ref", ref, a, "--device", "cpu", "--combine", "mean", "--buckets", "5",
                    "--src", src) == [
        "rnmt: warning: --device, --combine not used: for model scores (-m) only",
        "rnmt: warning: --src, --buckets not used: for --by-length only"]
    assert warnings("--ref", ref, a, "--bootstrap-samples", "10") == [
        "rnmt: warning: --bootstrap-samples not used: for --significance only"]
    assert warnings("--ref", ref, a, "--significance", "--bootstrap-samples", "10", a) == []

    (tmp_path / "src").write_text("one\ntwo\n")
    (tmp_path / "ref").write_text("eins\nzwei\n")
    model = ["-m", str(trained_checkpoint), "--src", str(tmp_path / "src"), "--device", "cpu"]
    assert warnings(*model, "--ref", str(tmp_path / "ref"), "--batch-size", "8") == []
    assert warnings(*model, "--ref", str(tmp_path / "ref"), "--tokenize", "intl",
                    "--nbest-weight", "2") == [
        "rnmt: warning: --tokenize, --nbest-weight not used: -m gives model scores (forced "
        "decoding), not metrics"]
    (tmp_path / "nbest").write_text("0\t-3.0\teins\n1\t-1.0\tzwei\n")
    rescore = [*model, "--nbest-rescore", str(tmp_path / "nbest")]
    assert warnings(*rescore, "--nbest-weight", "0.5", "--combine", "mean") == []
    assert warnings(*rescore, "--ref", str(tmp_path / "ref"), "--metrics", "bleu", a) == [
        f"rnmt: warning: {a} not used: --nbest-rescore re-ranks the n-best file",
        "rnmt: warning: --ref, --metrics not used: --nbest-rescore re-ranks the n-best file "
        "by model scores"]


def test_nbest_rescoring_reports_json(trained_checkpoint, tmp_path):
    (tmp_path / "src").write_text("one\ntwo\n")
    (tmp_path / "nbest").write_text("0\t-3.0\teins\n0\t-1.0\tzwei\n")
    out = rnmt("score", "-m", str(trained_checkpoint), "--src", str(tmp_path / "src"),
               "--nbest-rescore", str(tmp_path / "nbest"), "--device", "cpu", "--json",
               check=True).stdout
    first, second = json.loads(out)
    assert second is None  # no candidates for line 1
    assert first["text"] == "eins" and first["index"] == 0  # the model knows "one" = "eins"
    assert first["original"] == -3.0 and len(first["models"]) == 1
    assert first["score"] == pytest.approx(first["models"][0], abs=1e-3)

def test_malformed_nbest_line_names_file_and_line(trained_checkpoint, tmp_path):
    (tmp_path / "src").write_text("one\n")
    (tmp_path / "nbest").write_text("0\t-1.5\teins\n0 -2.0 zwei\n")
    err = one_line_error(rnmt("score", "-m", str(trained_checkpoint), "--src",
                                  str(tmp_path / "src"), "--nbest-rescore",
                                  str(tmp_path / "nbest"), "--device", "cpu"))
    assert f"{tmp_path / 'nbest'}: line 2" in err


@pytest.fixture(scope="module")
def lm_checkpoint(trained_checkpoint, tmp_path_factory) -> Path:
    """A small (untrained, seeded) language model over the German side's vocabulary."""
    from rnmt.checkpoint import load_checkpoint, save_checkpoint
    from rnmt.models import ModelConfig, build_model

    payload = load_checkpoint(trained_checkpoint)
    size = len(payload["tgt_vocab"]["pieces"])
    config = ModelConfig(size, size, arch="lm", emb_dim=16, dec_hidden_dim=24, dropout=0.0)
    torch.manual_seed(0)
    model = build_model(config)
    path = tmp_path_factory.mktemp("lm") / "lm.pt"
    save_checkpoint({"model_config": config.to_dict(), "model": model.state_dict(),
                     "src_vocab": payload["tgt_vocab"], "tgt_vocab": payload["tgt_vocab"]},
                    path)
    return path


def test_language_model_scores_stdin_lines_and_their_perplexity(lm_checkpoint, pairs):
    from rnmt.scoring import ForcedScorer
    from rnmt.vocab import BOS, EOS

    lines = pairs[1][:12]
    loaded = ForcedScorer.load(lm_checkpoint, device="cpu").loaded
    assert loaded.is_language_model
    expected = []
    with torch.no_grad():  # p(y) one step at a time; the LM reads no source
        for line in lines:
            targets = [*loaded.tgt_vocab.encode([line])[0].tolist(), EOS]
            enc = loaded.model.encode(torch.zeros(1, 1, dtype=torch.long), torch.ones(1))
            state, prev, total = loaded.model.init_state(enc), BOS, 0.0
            for y in targets:
                log_probs, state, _ = loaded.model.step(torch.tensor([prev]), state, enc)
                total, prev = total + float(log_probs[0, y]), y
            expected.append((total, len(targets)))

    result = CliRunner().invoke(app(), ["score", "-m", str(lm_checkpoint), "--device", "cpu",
                                        "--json"], input="\n".join(lines) + "\n")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert [r["tokens"] for r in report["lines"]] == [n for _, n in expected]
    assert [r["log_prob"] for r in report["lines"]] == pytest.approx(
        [lp for lp, _ in expected], abs=1e-3)
    nll = -sum(lp for lp, _ in expected) / sum(n for _, n in expected)
    assert report["perplexity"] == pytest.approx(math.exp(nll), rel=1e-4)
