"""The decoder's per-step layers on other kernels (`rnmt.step_layers`): oneDNN, the fp32 CPU
translation path (same numbers as torch's own layers, up to rounding), and int8."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rnmt.models import ModelConfig, build_model
from rnmt.nn.rnn import RNN
from rnmt.quantize import Int8Linear
from rnmt.search import SearchConfig
from rnmt.nn.onednn import OneDNNLinear, onednn_available
import rnmt.step_layers
from rnmt.step_layers import StepRecurrent, TokenProducts, pack_for_cpu
from rnmt.translator import Translator, prepare_model

needs_onednn = pytest.mark.skipif(not onednn_available(), reason="torch built without oneDNN")
needs_onednn_bf16 = pytest.mark.skipif(
    not (onednn_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()),
    reason="oneDNN has no bf16 kernels on this CPU (it needs AVX-512 or AMX)")


@needs_onednn
def test_a_onednn_linear_computes_the_float_linear():
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 200)
    packed = OneDNNLinear(linear.weight, linear.bias)
    for rows in (1, 7, 320):  # one packing serves any number of rows
        x = torch.randn(rows, 3, 96)  # and any leading dimensions, as nn.Linear
        y = packed(x)
        assert y.shape == (rows, 3, 200) and y.dtype == torch.float32
        torch.testing.assert_close(y, F.linear(x, linear.weight, linear.bias), rtol=1e-5,
                                   atol=1e-5)
    x = torch.randn(5, 96)
    torch.testing.assert_close(OneDNNLinear(linear.weight)(x), x @ linear.weight.t(),
                               rtol=1e-5, atol=1e-5)


@needs_onednn_bf16
def test_a_bf16_onednn_linear_multiplies_the_bf16_roundings_in_fp32():
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 200)
    packed = OneDNNLinear(linear.weight, linear.bias, dtype=torch.bfloat16)
    x = torch.randn(7, 3, 96)
    y = packed(x)
    linear.requires_grad_(False)
    assert y.shape == (7, 3, 200) and y.dtype == torch.float32
    # What it promises: bf16 inputs and weight, fp32 accumulation and bias, the result
    # rounded once to bf16. fp32 alone would differ by ~1e-3 of |y| (the inputs' rounding).
    bf16 = lambda t: t.bfloat16().float()  # noqa: E731
    exact = bf16(F.linear(bf16(x), bf16(linear.weight), linear.bias))
    torch.testing.assert_close(y, exact, rtol=1e-2, atol=1e-2)
    assert _relative_error(y, exact) < 4e-3
    assert _relative_error(y, F.linear(x, linear.weight, linear.bias)) > 1e-4


def _relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return float((approx - exact).norm() / exact.norm())


@pytest.mark.parametrize("linear, tolerance", [
    pytest.param(OneDNNLinear, 1e-6, marks=needs_onednn),
    (Int8Linear, 0.04),  # int8 weights and activations: within a few percent
])
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_the_swapped_recurrent_step_is_the_fused_step(cell, linear, tolerance):
    torch.manual_seed(2)
    rnn = RNN(cell, 48, 64, num_layers=2).eval()
    swapped = StepRecurrent(rnn, linear)
    x = torch.randn(10, 48)
    h = torch.randn(2, 10, 64) * 0.5
    state = (h, torch.randn(2, 10, 64) * 0.5) if cell == "lstm" else h
    with torch.no_grad():
        out, new_state = rnn.step(x, state)
        s_out, s_state = swapped.step(x, state)
    assert _relative_error(s_out, out) < tolerance
    parts = (lambda s: s if cell == "lstm" else (s,))  # noqa: E731
    for exact, approx in zip(parts(new_state), parts(s_state)):
        assert approx.shape == exact.shape
        assert _relative_error(approx, exact) < tolerance


def _model(**overrides):
    torch.manual_seed(0)
    config = ModelConfig(src_vocab_size=30, tgt_vocab_size=30, emb_dim=16, hidden_dim=16,
                         dec_hidden_dim=24, attn_dim=12, output_dim=20, dropout=0.0,
                         **overrides)
    return build_model(config).eval()


def test_token_products_are_the_embeddings_products_in_and_beyond_the_table():
    torch.manual_seed(0)
    embedding = torch.randn(50, 8)
    weights = [torch.randn(12, 8), torch.randn(5, 8)]
    ids = torch.tensor([0, 9, 10, 49, 3, 10, 31])
    for max_bytes, rows in ((10 * 17 * 4, 10), (1, 1), (1 << 20, 50)):
        products = TokenProducts(embedding, weights, max_bytes)
        assert products.table.shape == (rows, 17)
        parts = products(ids)
        assert [p.shape for p in parts] == [(7, 12), (7, 5)]
        for part, weight in zip(parts, weights):
            torch.testing.assert_close(part, embedding[ids] @ weight.t())


@needs_onednn
@pytest.mark.parametrize("table_bytes", [None, 1])  # the whole vocabulary; one piece
@pytest.mark.parametrize("overrides", [dict(tie_embeddings=True), dict(arch="seq2seq"),
                                       dict(attention="general", input_feeding=True),
                                       dict(attention="general"), dict(cell="rnn"),
                                       dict(cell="gru"), dict(dec_layers=2), dict(arch="lm")])
def test_a_packed_model_computes_what_the_model_computes(overrides, table_bytes, monkeypatch):
    if table_bytes is not None:
        monkeypatch.setattr(rnmt.step_layers, "TOKEN_TABLE_BYTES", table_bytes)
    model = _model(**overrides)
    src = torch.randint(4, 30, (3, 7))
    lengths, tgt = torch.tensor([7, 5, 2]), torch.randint(4, 30, (3, 6))
    decoder = model.decoder if hasattr(model, "decoder") else model
    rnn_input = decoder.rnn.layer.weight_ih_l0.size(1)
    with torch.no_grad():
        exact = model(src, lengths, tgt)
        packed = pack_for_cpu(model)  # in place
        assert isinstance(decoder.rnn, StepRecurrent)
        # An attentive decoder with an LSTM or tanh RNN looks its embeddings' products up,
        # and its products leave out the embedding's columns.
        looks_up = hasattr(decoder, "attention") and overrides.get("cell") != "gru"
        assert (getattr(decoder, "token_products", None) is not None) == looks_up
        if looks_up:  # [x_t; h_{t-1}] without E y_{t-1}: emb 16, decoder hidden 24
            assert decoder.rnn.gemms[0].in_features == rnn_input - 16 + 24
        torch.testing.assert_close(packed(src, lengths, tgt), exact, rtol=1e-4, atol=1e-5)


@needs_onednn
def test_only_fp32_cpu_models_are_packed(monkeypatch):
    for dtype in (torch.float64, torch.bfloat16):
        assert isinstance(pack_for_cpu(_model().to(dtype)).decoder.rnn, RNN)
    with monkeypatch.context() as no_bf16:  # bf16 without oneDNN's bf16: the model cast
        no_bf16.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
        cast = prepare_model(_model(), precision="bf16")
        assert isinstance(cast.decoder.rnn, RNN)
        assert {p.dtype for p in cast.parameters()} == {torch.bfloat16}
    with monkeypatch.context() as switched_off:
        switched_off.setattr(torch.backends.mkldnn, "enabled", False)
        assert isinstance(pack_for_cpu(_model()).decoder.rnn, RNN)
    model = _model()
    packed = pack_for_cpu(model)
    assert isinstance(packed.decoder.rnn, StepRecurrent)
    assert all(isinstance(m, OneDNNLinear) for m in (packed.decoder.output, packed.generator,
                                                     packed.decoder.attention.query_proj))
    assert isinstance(packed.encoder.rnn, RNN)  # run once per sentence: stays as it is


@needs_onednn_bf16
def test_bf16_on_the_cpu_multiplies_in_bf16_and_keeps_the_rest_fp32():
    model = _model()
    src = torch.randint(4, 30, (3, 7))
    lengths, tgt = torch.tensor([7, 5, 2]), torch.randint(4, 30, (3, 6))
    with torch.no_grad():
        exact = model(src, lengths, tgt)
        packed = prepare_model(model, precision="bf16")
        assert isinstance(packed.decoder.rnn, StepRecurrent)
        layers = (packed.decoder.output, packed.generator, packed.decoder.attention.query_proj,
                  packed.decoder.rnn.gemms[0])
        assert all(isinstance(m, OneDNNLinear) and m.dtype == torch.bfloat16 for m in layers)
        # The weights left as parameters (embeddings, encoder, attention's v) stay fp32.
        assert {p.dtype for p in packed.parameters()} == {torch.float32}
        approx = packed(src, lengths, tgt)
    assert approx.dtype == torch.float32
    assert 1e-5 < _relative_error(approx, exact) < 0.02


@needs_onednn
@pytest.mark.parametrize("table_bytes", [None, 1])  # the default table; rare pieces only
def test_packed_translation_is_the_unpacked_translation(trained_checkpoint, corpus_dir,
                                                        table_bytes, monkeypatch):
    if table_bytes is not None:
        monkeypatch.setattr(rnmt.step_layers, "TOKEN_TABLE_BYTES", table_bytes)
    lines = (corpus_dir / "test.en").read_text("utf-8").splitlines()[:40]
    config = SearchConfig(beam=4, nbest=2)
    results = [Translator.load(trained_checkpoint, config, device="cpu", pack=pack).nbest(lines)
               for pack in (False, True)]
    assert isinstance(Translator.load(trained_checkpoint, config, device="cpu").model.decoder.rnn,
                      StepRecurrent)
    for plain, packed in zip(*results):
        assert [t.text for t in packed] == [t.text for t in plain]
        for a, b in zip(packed, plain):
            assert a.score == pytest.approx(b.score, abs=1e-4)
