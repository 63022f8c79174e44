"""Int8 inference (`rnmt.quantize`, `rnmt translate --quantize int8`)."""

from __future__ import annotations

import pytest
import sacrebleu
import torch
import torch.nn.functional as F

from conftest import run_rnmt
from rnmt.data import pad_sentences
from rnmt.models import ModelConfig, build_model
from rnmt.models.ensemble import Ensemble
from rnmt.nn.rnn import RNN
from rnmt.quantize import (Int8Linear, _onednn_int8_available, onednn_int8_runs,
                           quantize_activation, quantize_for_inference)
from rnmt.search import SearchConfig, beam_search, greedy_search
from rnmt.step_layers import StepRecurrent
from rnmt.translator import Translator
from rnmt.vocab import EOS


def _relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return float((approx - exact).detach().norm() / exact.detach().norm())


# Both kernels where this torch runs them: oneDNN's (the default on AMX CPUs) and fbgemm's.
BACKENDS = [pytest.param("onednn", marks=pytest.mark.skipif(
    not _onednn_int8_available(), reason="this torch build has no oneDNN int8 kernels")),
    "fbgemm"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("leading", [(3, 11), (64, 5), (1,)])  # 33 rows run padded to 40
def test_int8_linear_is_close_to_the_float_linear(backend, leading):
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 200)
    x = torch.randn(*leading, 96)  # any leading dimensions, as nn.Linear
    y = Int8Linear(linear.weight, linear.bias, backend=backend)(x)
    assert y.shape == (*leading, 200) and y.dtype == torch.float32
    assert _relative_error(y, F.linear(x, linear.weight, linear.bias)) < 0.02


@pytest.mark.parametrize("backend", BACKENDS)
def test_int8_linear_takes_no_rows(backend):
    layer = Int8Linear(torch.randn(200, 96), torch.randn(200), backend=backend)
    assert layer(torch.randn(0, 4, 96)).shape == (0, 4, 200)


@pytest.mark.parametrize("backend", BACKENDS)
def test_int8_weights_are_within_half_a_step_of_the_float_weights(backend):
    torch.manual_seed(1)
    weight = torch.randn(64, 40) * torch.logspace(-3, 0, 64).unsqueeze(1)  # rows of all sizes
    dequantized = Int8Linear(weight, backend=backend).dequantized_weight()
    step = weight.abs().amax(dim=1, keepdim=True) / 127  # one scale per output row
    assert bool(((dequantized - weight).abs() <= step / 2 + 1e-7).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_int8_product_is_the_product_of_the_quantized_operands(backend):
    """What the kernel computes, exactly enough to tell a wrong scale or zero point: the
    fp32 product of the dequantised weight and the dequantised input, plus the bias."""
    torch.manual_seed(4)
    linear = torch.nn.Linear(48, 30)
    x = torch.rand(7, 48) * 3 - 0.5  # skewed: a zero point far from the middle
    layer = Int8Linear(linear.weight, linear.bias, backend=backend)
    x_seen, tolerance = x, 2e-2  # fbgemm quantises x inside, over 7 bits: loosely
    if backend == "onednn":
        q, scale, zero_point = quantize_activation(x, 8)
        x_seen, tolerance = scale * (q[:7].float() - zero_point), 1e-5
    expected = x_seen @ layer.dequantized_weight().t() + linear.bias
    assert _relative_error(layer(x), expected) < tolerance


def test_activations_are_quantized_to_within_half_a_step_with_zero_exact():
    torch.manual_seed(2)
    # skewed, all positive, all negative, all zero; then ranges and offsets at random: the
    # extremes map next to 0 and 255 and must neither wrap around nor fall outside
    fixed = [torch.rand(5, 9) * 4 - 1, torch.rand(5, 9) + 2, -torch.rand(5, 9), torch.zeros(5, 9)]
    fuzz = [(torch.rand(5, 9) - torch.rand(())) * 10 ** (6 * torch.rand(()) - 3) for _ in range(300)]
    for x in fixed + fuzz:
        x[0, 0] = 0.0
        q, scale, zero_point = quantize_activation(x, 8)
        assert q.dtype == torch.uint8 and q.shape == (8, 9)
        assert bool((q[5:] == 0).all())  # padding rows: the kernel's shape only
        back = scale * (q[:5].float() - zero_point)
        assert float(back[0, 0]) == 0.0
        assert bool(((back - x).abs() <= scale * (0.5 + 1e-4)).all())


def test_the_default_int8_kernel_is_onednn_exactly_where_it_runs():
    layer = Int8Linear(torch.randn(8, 4))
    assert layer.backend == ("onednn" if onednn_int8_runs() else "fbgemm")


def test_a_quantized_model_swaps_the_per_step_layers_and_keeps_the_encoder():
    config = ModelConfig(src_vocab_size=40, tgt_vocab_size=30, emb_dim=16, hidden_dim=16,
                         dec_hidden_dim=24, attn_dim=12, output_dim=20, dropout=0.0,
                         tie_embeddings=True)
    model = quantize_for_inference(build_model(config))
    assert isinstance(model.decoder.rnn, StepRecurrent)
    assert isinstance(model.decoder.rnn.gemms[0], Int8Linear)
    assert all(isinstance(m, Int8Linear) for m in (model.decoder.output, model.generator,
                                                   model.projection,
                                                   model.decoder.attention.query_proj))
    assert isinstance(model.encoder.rnn, RNN)  # run once per sentence: stays fp32
    assert isinstance(model.decoder.embed, torch.nn.Embedding)  # tied to the generator


def test_teacher_forcing_through_a_quantized_language_model_is_close_to_fp32():
    torch.manual_seed(3)
    config = ModelConfig(src_vocab_size=30, tgt_vocab_size=30, arch="lm", emb_dim=16,
                         dec_hidden_dim=32, dropout=0.0)
    model = build_model(config).eval()
    tokens = torch.randint(4, 30, (4, 9))
    lengths = torch.full((4,), 9)
    with torch.no_grad():
        exact = model(tokens, lengths, tokens)
        approx = quantize_for_inference(model)(tokens, lengths, tokens)
    assert _relative_error(approx, exact) < 0.04


@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_beam_1_is_greedy_search_on_the_cpu_translation_layers(trained_checkpoint, corpus_dir,
                                                               quantize):
    """On the layers `rnmt translate` swaps in on a CPU (oneDNN fp32 by default, or int8),
    beam search with k = 1 is greedy search."""
    translator = Translator.load(trained_checkpoint, SearchConfig(beam=1), device="cpu",
                                 quantize=quantize)
    lines = (corpus_dir / "test.en").read_text("utf-8").splitlines()[:24]
    ids = translator.src_vocab.encode(lines)
    src, lengths = pad_sentences(ids, suffix=EOS)
    config = SearchConfig(beam=1)
    greedy = greedy_search(translator.model, src, lengths, config)
    beam = beam_search(translator.model, src, lengths, config)
    assert [h.tokens for h in greedy] == [hyps[0].tokens for hyps in beam]
    for g, (b, *_) in zip(greedy, beam):
        assert g.score == pytest.approx(b.score, abs=1e-4)


def test_an_ensemble_is_quantized_member_by_member(trained_checkpoint):
    translator = Translator.load([trained_checkpoint, trained_checkpoint], SearchConfig(beam=2),
                                 device="cpu", quantize="int8")
    assert isinstance(translator.model, Ensemble)
    assert all(isinstance(m.decoder.rnn.gemms[0], Int8Linear) for m in translator.model.members)
    lines = ["one hundred twelve", "seven", "four hundred twenty-one"]
    # Two copies of one model: their average is that model, so the ensemble's search
    # gives the single int8 model's translations, with its scores.
    single = Translator.load(trained_checkpoint, SearchConfig(beam=2), device="cpu",
                             quantize="int8")
    together, alone = translator.nbest(lines), single.nbest(lines)
    assert all(t[0].text for t in together)
    assert [t[0].text for t in together] == [t[0].text for t in alone]
    for (t, *_), (a, *_) in zip(together, alone):
        assert t.raw_score == pytest.approx(a.raw_score, abs=1e-4)


def test_int8_translation_of_the_demo_is_nearly_the_fp32_translation(trained_checkpoint,
                                                                      corpus_dir):
    source = (corpus_dir / "test.en").read_text("utf-8")
    refs = (corpus_dir / "test.de").read_text("utf-8").splitlines()
    outputs = {}
    for quantize in ("none", "int8"):
        result = run_rnmt("translate", "-m", str(trained_checkpoint), "--beam", "5",
                          "--device", "cpu", "--quantize", quantize, stdin=source, check=True)
        outputs[quantize] = result.stdout.decode("utf-8").splitlines()
    fp32, int8 = outputs["none"], outputs["int8"]
    assert len(int8) == len(fp32) == len(refs)
    same = sum(a == b for a, b in zip(fp32, int8))
    assert same >= 0.9 * len(fp32), f"{same} of {len(fp32)} lines identical"
    # One changed line of these 60 moves chrF by up to ~1.5 points.
    chrf = [sacrebleu.corpus_chrf(out, [refs]).score for out in (fp32, int8)]
    assert abs(chrf[0] - chrf[1]) < 2.0, chrf


def test_int8_on_a_gpu_is_a_one_line_error(trained_checkpoint):
    # Refused from the device name alone, before any CUDA call: testable without a GPU.
    result = run_rnmt("translate", "-m", str(trained_checkpoint), "--device", "cuda",
                      "--quantize", "int8", stdin="seven\n")
    lines = result.stderr.decode().strip().splitlines()
    assert result.returncode == 2 and result.stdout == b""
    assert lines == ["rnmt: error: --quantize int8 runs on the CPU only (device cuda); on a "
                     "GPU use --precision bf16 or fp16"]


def test_int8_with_bf16_is_refused(trained_checkpoint):
    result = run_rnmt("translate", "-m", str(trained_checkpoint), "--device", "cpu",
                      "--quantize", "int8", "--precision", "bf16", stdin="seven\n")
    assert result.returncode == 2
    assert result.stderr.decode().startswith("rnmt: error: --quantize int8 computes in fp32")
