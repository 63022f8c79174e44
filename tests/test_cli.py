"""The command line, driven as a user drives it: subprocesses, files, stdin and stdout."""

from __future__ import annotations

import json

from conftest import ROOT, run_rnmt, write_corpus


def test_help_lists_every_subcommand():
    out = run_rnmt("--help", check=True).stdout.decode()
    for command in ("preprocess", "train", "translate", "score"):
        assert command in out


def test_version_names_rnmt_and_the_libraries_it_runs_on():
    import sacrebleu
    import sentencepiece
    import tomllib
    import torch

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    out = run_rnmt("--version", check=True).stdout.decode()
    assert out == (f"rnmt {project['version']} (torch {torch.__version__}, sentencepiece "
                   f"{sentencepiece.__version__}, sacrebleu {sacrebleu.__version__})\n")


def test_preprocess_train_translate_score_end_to_end(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", n_train=400, n_valid=30, n_test=30)
    run_rnmt("preprocess", "-s", "en", "-t", "de", "--train", str(corpus / "train"),
             "--valid", str(corpus / "valid"), "--test", str(corpus / "test"),
             "--out", str(tmp_path / "bin"), "--vocab-size", "200", check=True)
    meta = json.loads((tmp_path / "bin" / "meta.json").read_text())
    assert meta["splits"]["train"]["kept"] == 400 and meta["src_lang"] == "en"

    result = run_rnmt("train", str(tmp_path / "bin"), "--save-dir", str(tmp_path / "run"),
                      "--emb-dim", "16", "--hidden-dim", "16", "--dec-hidden-dim", "32",
                      "--attn-dim", "16", "--output-dim", "32", "--max-steps", "15",
                      "--max-tokens", "500", "--device", "cpu", "--log-every", "5",
                      "--valid-bleu", "--valid-samples", "2", check=True)
    assert b"parameters" in result.stderr and result.stdout == b""
    log = result.stderr.decode().splitlines()
    valid = [line for line in log if line.startswith("valid epoch")]
    assert valid and all(" BLEU " in line and " chrF " in line for line in valid)
    for kind in ("src", "ref", "hyp"):  # the sample translations of each validation
        assert sum(line.startswith(f"  {kind}: ") for line in log) == 2 * len(valid)
    assert (tmp_path / "run" / "best.pt").exists() and (tmp_path / "run" / "last.pt").exists()

    sources = (corpus / "test.en").read_text()
    result = run_rnmt("translate", "-m", str(tmp_path / "run" / "best.pt"), "--beam", "3",
                      stdin=sources, check=True)
    hyps = result.stdout.decode().splitlines()
    assert len(hyps) == 30
    (tmp_path / "hyp.de").write_text(result.stdout.decode())

    result = run_rnmt("score", "--ref", str(corpus / "test.de"), str(tmp_path / "hyp.de"),
                      "--json", check=True)
    scores = json.loads(result.stdout)
    assert set(scores) == {"bleu", "chrf"} and "nrefs:1" in scores["bleu"]["signature"]


def test_translate_keeps_one_line_per_input_line_with_empty_lines(trained_checkpoint):
    lines = ["four hundred twenty-one", "", "   ", "nine", "", "seven hundred five"]
    result = run_rnmt("translate", "-m", str(trained_checkpoint), "--beam", "2",
                      stdin="\n".join(lines) + "\n", check=True)
    out = result.stdout.decode().split("\n")
    assert out[-1] == "" and len(out) - 1 == len(lines)
    for i, line in enumerate(lines):
        assert (out[i] == "") == (line.strip() == ""), (i, out[i])


def test_greedy_output_is_the_same_whatever_the_batch_size(trained_checkpoint, corpus_dir):
    # beam 1 is greedy search (`search_nbest`); beam 1 = beam search's k = 1 is
    # tests/test_search.py's and test_quantize.py's.
    sources = (corpus_dir / "test.en").read_text()
    beam1 = run_rnmt("translate", "-m", str(trained_checkpoint), "--beam", "1",
                     stdin=sources, check=True).stdout
    again = run_rnmt("translate", "-m", str(trained_checkpoint), "--beam", "1",
                     "--batch-size", "7", stdin=sources, check=True).stdout
    assert beam1 == again


def test_unequal_parallel_files_are_one_line_error_with_exit_2(tmp_path):
    (tmp_path / "c.en").write_text("one\ntwo\nthree\n")
    (tmp_path / "c.de").write_text("eins\nzwei\n")
    result = run_rnmt("preprocess", "-s", "en", "-t", "de", "--train", str(tmp_path / "c"),
                      "--out", str(tmp_path / "bin"))
    assert result.returncode == 2
    err = result.stderr.decode().strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "c.en has 3 lines" in err and "c.de has 2" in err


def test_missing_or_corrupt_checkpoint_is_exit_2(tmp_path):
    result = run_rnmt("translate", "-m", str(tmp_path / "nope.pt"), stdin="one\n")
    assert result.returncode == 2 and b"no such checkpoint" in result.stderr
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint at all")
    result = run_rnmt("translate", "-m", str(tmp_path / "bad.pt"), stdin="one\n")
    assert result.returncode == 2 and b"Traceback" not in result.stderr


def test_score_rejects_line_count_mismatch(tmp_path):
    (tmp_path / "ref").write_text("a b c\nd e f\n")
    (tmp_path / "hyp").write_text("a b c\n")
    result = run_rnmt("score", "--ref", str(tmp_path / "ref"), str(tmp_path / "hyp"))
    assert result.returncode == 2 and b"line counts differ" in result.stderr


def test_score_reads_stdin_and_matches_sacrebleu(tmp_path):
    from sacrebleu.metrics import BLEU

    refs = ["the cat sat on the mat .", "a dog runs in the park ."]
    hyps = ["the cat sat on a mat .", "a dog runs in a park ."]
    (tmp_path / "ref").write_text("\n".join(refs) + "\n")
    result = run_rnmt("score", "--ref", str(tmp_path / "ref"), "--json",
                      stdin="\n".join(hyps) + "\n", check=True)
    expected = BLEU().corpus_score(hyps, [refs]).score
    assert abs(json.loads(result.stdout)["bleu"]["score"] - expected) < 1e-3
