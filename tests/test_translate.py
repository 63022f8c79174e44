"""`rnmt translate` and `rnmt average`: search options, outputs, streams, ensembles."""

from __future__ import annotations

import json
import os
import subprocess
import warnings
from types import SimpleNamespace

import pytest
import torch

from typer.testing import CliRunner

from conftest import RNMT
from rnmt.alignment import hard_alignment, pharaoh, word_of_pieces
from rnmt.checkpoint import average_checkpoints, latest_checkpoints, load_checkpoint, save_checkpoint
from rnmt.search import SearchConfig, length_penalty
from rnmt.translator import Translator
from rnmt.vocab import BOS, EOS


def run_rnmt(*args: str, stdin: str | bytes = b"", check: bool = False):
    """The CLI in this process (no interpreter start-up per call), with the fields of
    subprocess.CompletedProcess: returncode, stdout and stderr as bytes."""
    from rnmt_cli.main import app

    result = CliRunner().invoke(app, list(args), input=stdin)
    if check and result.exit_code != 0:
        raise AssertionError(f"rnmt {' '.join(args)} failed:\n{result.stderr}")
    return SimpleNamespace(returncode=result.exit_code, stdout=result.stdout_bytes,
                           stderr=result.stderr_bytes)


@pytest.fixture(scope="module")
def sources(corpus_dir) -> list[str]:
    return (corpus_dir / "test.en").read_text("utf-8").splitlines()[:40]


def test_output_is_the_same_for_batch_sizes_1_and_64(trained_checkpoint, sources):
    config = SearchConfig(beam=4)
    one = Translator.load(trained_checkpoint, config, device="cpu", batch_size=1)
    many = Translator.load(trained_checkpoint, config, device="cpu", batch_size=64)
    assert list(one.translate_lines(sources)) == list(many.translate_lines(sources))


def test_nbest_scores_are_sorted_and_equal_forced_decoding(trained_checkpoint, sources):
    config = SearchConfig(beam=4, nbest=3)
    translator = Translator.load(trained_checkpoint, config, device="cpu")
    model, vocab = translator.model, translator.tgt_vocab
    for line, ids, translations in zip(sources[:8], translator.src_vocab.encode(sources[:8]),
                                       translator.nbest(sources[:8])):
        assert len(translations) == 3
        assert [t.score for t in translations] == sorted((t.score for t in translations),
                                                          reverse=True)
        src = torch.tensor([ids.tolist() + [EOS]])
        for t in translations:
            tokens = [vocab.pieces.index(p) for p in t.pieces]
            with torch.no_grad():
                logits = model(src, torch.tensor([src.size(1)]), torch.tensor([[BOS] + tokens]))
            gold = torch.tensor(tokens + [EOS])
            forced = float(torch.log_softmax(logits, -1)[0, torch.arange(len(gold)), gold].sum())
            assert abs(forced / length_penalty(len(tokens) + 1, 1.0) - t.score) < 1e-4


def test_batches_searched_at_once_by_workers_give_the_same_outputs(trained_checkpoint,
                                                                    sources):
    config = SearchConfig(beam=3, nbest=2)
    alone = Translator.load(trained_checkpoint, config, device="cpu", batch_size=6)
    workers = Translator.load(trained_checkpoint, config, device="cpu", batch_size=6,
                              workers=3)
    lines = sources + ["", "   "]  # blank lines stay blank
    expected, got = alone.nbest(lines), workers.nbest(lines)
    assert [[t.text for t in ts] for ts in got] == [[t.text for t in ts] for ts in expected]
    # each worker runs on 1 of the threads: sums may round differently in the last bits
    for ts_got, ts_expected in zip(got, expected):
        for a, b in zip(ts_got, ts_expected):
            assert abs(a.score - b.score) < 1e-4


def test_cli_workers_translate_as_one_and_refuse_nonsense(trained_checkpoint, sources):
    text = "\n".join(sources[:20]) + "\n"
    one = run_rnmt("translate", "-m", str(trained_checkpoint), "--batch-size", "4",
                   "--device", "cpu", stdin=text, check=True)
    two = run_rnmt("translate", "-m", str(trained_checkpoint), "--batch-size", "4",
                   "--device", "cpu", "--workers", "2", "--threads", "2", stdin=text,
                   check=True)
    assert two.stdout == one.stdout and len(one.stdout.decode().splitlines()) == 20
    bad = run_rnmt("translate", "-m", str(trained_checkpoint), "--workers", "0", stdin=text)
    lines = bad.stderr.decode().strip().splitlines()
    assert bad.returncode == 2 and bad.stdout == b""
    assert lines == ["rnmt: error: --workers must be at least 1"]


def test_cli_nbest_prints_index_score_text_k_per_line(trained_checkpoint, sources):
    result = run_rnmt("translate", "-m", str(trained_checkpoint), "--beam", "3", "--nbest", "2",
                      stdin="\n".join(sources[:3]) + "\n", check=True)
    rows = [line.split("\t") for line in result.stdout.decode().splitlines()]
    assert [r[0] for r in rows] == ["0", "0", "1", "1", "2", "2"]
    for first, second in zip(rows[::2], rows[1::2]):
        assert float(first[1]) >= float(second[1])
        assert first[2] != second[2]


def test_alignment_and_json_outputs_carry_the_attention(trained_checkpoint, sources):
    stdin = "\n".join(sources[:4]) + "\n"
    text = run_rnmt("translate", "-m", str(trained_checkpoint), "--beam", "2", "--alignment",
                    stdin=stdin, check=True).stdout.decode().splitlines()
    rows = run_rnmt("translate", "-m", str(trained_checkpoint), "--beam", "2",
                    "--output-format", "json", stdin=stdin, check=True).stdout.decode()
    objects = [json.loads(line) for line in rows.splitlines()]
    assert len(text) == len(objects) == 4
    for source, line, obj in zip(sources, text, objects):
        translation, pairs = line.split("\t")
        assert translation == obj["translation"]
        attention = torch.tensor(obj["attention"])
        assert attention.shape == (len(obj["pieces"]) + 1, len(obj["source_pieces"]) + 1)
        torch.testing.assert_close(attention.sum(-1), torch.ones(len(attention)), atol=1e-4,
                                   rtol=0)
        assert pairs == pharaoh(hard_alignment(obj["source_pieces"], obj["pieces"], attention))
        for pair in pairs.split():
            i, j = map(int, pair.split("-"))
            assert 0 <= i < len(source.split()) and 0 <= j < len(translation.split())


def test_pieces_map_to_whitespace_words():
    assert word_of_pieces(["\u2581four", "\u2581thirty", "-", "three"]) == [0, 1, 1, 1]
    attention = torch.tensor([[0.1, 0.2, 0.7], [0.8, 0.1, 0.1]])
    assert hard_alignment(["\u2581a", "\u2581b", "c"], ["\u2581x", "\u2581y"], attention) == [
        (1, 0), (0, 1)]


def test_attention_plots_are_written_or_refused_in_one_line(trained_checkpoint, sources,
                                                            tmp_path):
    stdin = "\n".join(sources[:2]) + "\n"
    try:
        import matplotlib  # noqa: F401

        run_rnmt("translate", "-m", str(trained_checkpoint), "--beam", "2", "--attention-plot",
                 str(tmp_path / "plots"), stdin=stdin, check=True)
        assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["0.png", "1.png"]
    except ImportError:
        pass
    blocker = tmp_path / "block" / "matplotlib"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('blocked for the test')\n")
    env = dict(os.environ, PYTHONPATH=str(blocker.parent), OMP_NUM_THREADS="1")
    result = subprocess.run(RNMT + ["translate", "-m", str(trained_checkpoint),
                                    "--attention-plot", str(tmp_path / "p2")],
                            input=stdin.encode(), capture_output=True, env=env, timeout=120)
    assert result.returncode == 2
    assert result.stderr.decode().strip().count("\n") == 0
    assert "matplotlib" in result.stderr.decode()


def test_an_ensemble_of_a_model_with_itself_translates_like_the_model(trained_checkpoint,
                                                                      sources):
    alone = Translator.load(trained_checkpoint, SearchConfig(beam=3), device="cpu")
    pair = Translator.load([trained_checkpoint, trained_checkpoint], SearchConfig(beam=3),
                           device="cpu")
    assert list(alone.translate_lines(sources[:10])) == list(pair.translate_lines(sources[:10]))


def test_ensemble_members_with_other_vocabularies_are_refused(trained_checkpoint, tmp_path):
    payload = load_checkpoint(trained_checkpoint)
    pieces = payload["tgt_vocab"]["pieces"]
    pieces[4], pieces[5] = pieces[5], pieces[4]
    save_checkpoint(payload, tmp_path / "other.pt")
    result = run_rnmt("translate", "-m", str(trained_checkpoint), "-m",
                      str(tmp_path / "other.pt"), stdin="one\n")
    assert result.returncode == 2
    err = result.stderr.decode()
    assert err.count("\n") == 1 and "vocabulary" in err


def test_averaging_checkpoints_averages_their_parameters(trained_checkpoint, tmp_path):
    payload = load_checkpoint(trained_checkpoint)
    run = tmp_path / "run"
    for step, scale in ((100, 0.0), (200, 1.0), (300, 3.0)):
        scaled = dict(payload, step=step,
                      model={k: v * scale if v.is_floating_point() else v
                             for k, v in payload["model"].items()})
        save_checkpoint(scaled, run / f"ckpt{step}.pt")
    assert [p.name for p in latest_checkpoints(run, 2)] == ["ckpt200.pt", "ckpt300.pt"]
    result = run_rnmt("average", "-o", str(tmp_path / "avg.pt"), "--last", "2", "--save-dir",
                      str(run), check=True)
    assert result.returncode == 0
    averaged = load_checkpoint(tmp_path / "avg.pt")
    for name, value in payload["model"].items():
        if value.is_floating_point():
            torch.testing.assert_close(averaged["model"][name], 2.0 * value)
    explicit = average_checkpoints([run / "ckpt100.pt", run / "ckpt300.pt"])
    name = next(iter(payload["model"]))
    torch.testing.assert_close(explicit["model"][name], 1.5 * payload["model"][name])


def test_invalid_utf8_is_replaced_with_a_warning_or_stops_with_its_line(trained_checkpoint):
    data = b"one\nt\xffwo\nthree\n"
    replaced = run_rnmt("translate", "-m", str(trained_checkpoint), "--beam", "1", stdin=data)
    assert replaced.returncode == 0
    assert len(replaced.stdout.decode().splitlines()) == 3
    assert "1 input lines had invalid UTF-8" in replaced.stderr.decode()
    strict = run_rnmt("translate", "-m", str(trained_checkpoint), "--errors", "strict",
                      stdin=data)
    assert strict.returncode == 2
    assert "line 2" in strict.stderr.decode() and strict.stderr.decode().count("\n") == 1


def test_input_and_output_files_replace_the_redirections(trained_checkpoint, sources,
                                                         tmp_path):
    (tmp_path / "in.txt").write_text("\n".join(sources[:5]) + "\n", "utf-8")
    run_rnmt("translate", "-m", str(trained_checkpoint), "--input", str(tmp_path / "in.txt"),
             "--output", str(tmp_path / "out.txt"), check=True)
    piped = run_rnmt("translate", "-m", str(trained_checkpoint),
                     stdin="\n".join(sources[:5]) + "\n", check=True)
    assert (tmp_path / "out.txt").read_bytes() == piped.stdout


def test_interactive_use_answers_each_line_before_the_input_ends(trained_checkpoint, sources):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(RNMT + ["translate", "-m", str(trained_checkpoint), "--beam", "1",
                                    "--interactive"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
    try:
        assert proc.stdin is not None and proc.stdout is not None
        answers = []
        for line in sources[:2]:
            proc.stdin.write((line + "\n").encode())
            proc.stdin.flush()
            answers.append(proc.stdout.readline().decode().rstrip("\n"))  # stdin still open
        proc.stdin.close()
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
    expected = Translator.load(trained_checkpoint, SearchConfig(beam=1), device="cpu")
    assert answers == list(expected.translate_lines(sources[:2]))


def test_a_reader_leaving_early_ends_translation_quietly(trained_checkpoint, sources):
    shell = (f"{' '.join(RNMT)} translate -m {trained_checkpoint} --beam 1 --buffer-size 1 "
             "| head -1; exit ${PIPESTATUS[0]}")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(["bash", "-c", shell], input=("\n".join(sources * 50) + "\n").encode(),
                            capture_output=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stderr.decode() == ""
    assert len(result.stdout.decode().splitlines()) == 1


def test_a_language_model_continues_each_line(tmp_path):
    from rnmt.models import ModelConfig, build_model
    from rnmt.vocab import Vocabulary, train_sentencepiece

    lines = ["one two three", "four five six", "seven eight nine ten"] * 30
    vocab = Vocabulary.build(train_sentencepiece(lines, vocab_size=20, threads=1), lines)
    torch.manual_seed(0)
    config = ModelConfig(src_vocab_size=len(vocab), tgt_vocab_size=len(vocab), arch="lm",
                         emb_dim=8, dec_hidden_dim=8, dropout=0.0)
    save_checkpoint({"model_config": config.to_dict(), "model": build_model(config).state_dict(),
                     "src_vocab": vocab.state_dict(), "tgt_vocab": vocab.state_dict()},
                    tmp_path / "lm.pt")
    result = run_rnmt("translate", "-m", str(tmp_path / "lm.pt"), "--sample", "--seed", "1",
                      "--min-len", "1", "--max-len-b", "5", stdin="one two\n\n", check=True)
    out = result.stdout.decode().splitlines()
    assert len(out) == 2
    assert out[0].startswith("one two") and len(out[0]) > len("one two")
    assert out[1] != ""  # a blank line: generated from scratch
    refused = run_rnmt("translate", "-m", str(tmp_path / "lm.pt"), stdin="one two\n")
    assert refused.returncode == 2 and "--sample" in refused.stderr.decode()


# ---------------------------------------------------------------------------------------
# Numerics at load time: --precision, and loading without a second copy of the weights
# ---------------------------------------------------------------------------------------


def test_a_loaded_model_keeps_its_tied_and_shared_parameters_one_object(trained_checkpoint,
                                                                        tmp_path):
    from rnmt.models import ModelConfig, build_model
    from rnmt.translator import load_model

    vocab = load_checkpoint(trained_checkpoint)["src_vocab"]
    size = len(vocab["pieces"])
    config = ModelConfig(size, size, emb_dim=8, hidden_dim=8, dec_hidden_dim=8, attn_dim=8,
                         output_dim=8, dropout=0.0, tie_embeddings=True, share_embeddings=True)
    torch.manual_seed(0)
    model = build_model(config).eval()
    save_checkpoint({"model_config": config.to_dict(), "model": model.state_dict(),
                     "src_vocab": vocab, "tgt_vocab": vocab}, tmp_path / "tied.pt")
    loaded = load_model(tmp_path / "tied.pt", torch.device("cpu")).model
    assert loaded.generator.weight is loaded.decoder.embed.weight
    assert loaded.encoder.embed.weight is loaded.decoder.embed.weight
    src, lengths, tgt = torch.tensor([[5, 6, EOS]]), torch.tensor([3]), torch.tensor([[BOS, 7]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(src, lengths, tgt), model(src, lengths, tgt))


def test_bf16_on_the_cpu_translates_like_fp32_and_warns_without_bf16_units(trained_checkpoint,
                                                                            sources):
    from rnmt.precision import cpu_has_bf16_units

    stdin = "\n".join(sources[:24]) + "\n"
    fp32 = run_rnmt("translate", "-m", str(trained_checkpoint), "--device", "cpu",
                    "--output-format", "json", stdin=stdin, check=True)
    bf16 = run_rnmt("translate", "-m", str(trained_checkpoint), "--device", "cpu",
                    "--output-format", "json", "--precision", "bf16", stdin=stdin, check=True)
    warned = b"rnmt: warning: --precision bf16 on a CPU without AMX" in bf16.stderr
    assert warned != cpu_has_bf16_units()
    exact = [json.loads(line) for line in fp32.stdout.decode().splitlines()]
    approx = [json.loads(line) for line in bf16.stdout.decode().splitlines()]
    assert len(approx) == len(exact) == 24
    same = sum(a["translation"] == b["translation"] for a, b in zip(exact, approx))
    assert same >= 0.8 * len(exact), f"{same} of {len(exact)} identical"
    for a in approx:  # scores are summed in fp32; the attention rows still sum to 1
        assert all(abs(sum(row) - 1) < 0.02 for row in a["attention"])


@pytest.mark.parametrize("options, message", [
    (["--precision", "fp16", "--device", "cpu"], "--precision fp16 needs a CUDA device"),
    (["--precision", "fp8"], "unknown --precision 'fp8'; choose from fp32, bf16, fp16"),
    (["--quantize", "int4"], "unknown --quantize 'int4'; choose from none, int8"),
    (["--device", "gpu"], "--device gpu: unknown device; choose auto, cpu or cuda"),
    pytest.param(["--device", "cuda"], "--device cuda: CUDA is not available on this machine",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is here")),
])
def test_a_precision_the_device_cannot_run_is_a_one_line_error(trained_checkpoint, options,
                                                               message):
    result = run_rnmt("translate", "-m", str(trained_checkpoint), *options, stdin="seven\n")
    lines = result.stderr.decode().strip().splitlines()
    assert result.returncode == 2 and result.stdout == b""
    assert len(lines) == 1 and lines[0].startswith(f"rnmt: error: {message}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (cuDNN)")
@pytest.mark.parametrize("precision", ["fp32", "fp16"])  # bf16: see compact_rnn_weights
def test_rnn_weights_are_one_block_for_cudnn_after_loading_and_casting(trained_checkpoint,
                                                                        precision):
    translator = Translator.load(trained_checkpoint, SearchConfig(beam=2), device="cuda",
                                 precision=precision)
    for module in translator.model.modules():
        if isinstance(module, torch.nn.RNNBase):
            weights = module._flat_weights
            # one allocation: consecutive weights, as flatten_parameters lays them out
            assert all(w.untyped_storage().data_ptr() == weights[0].untyped_storage().data_ptr()
                       for w in weights)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*contiguous chunk of memory.*")
        translator.nbest(["seven", "eight nine"])
