"""`--precision bf16` training on a CPU with bf16 matrix units (AMX, AVX512-BF16): the CPU
training kernels (`RecurrentProduct`, `VocabularyLoss`, `Stepper`, `AttentionSteps`,
`lstm_layer_bf16`) multiply in bf16 and keep everything else, and the gradients, in fp32."""

from __future__ import annotations

import pytest
import torch

from conftest import through_recurrence
from rnmt.models import ModelConfig, build_model
from rnmt.nn.attention import AttentionSteps
from rnmt.nn import rnn as rnn_module
from rnmt.nn.loss import VocabularyLoss
from rnmt.nn.lstm_layer import lstm_layer_bf16
from rnmt.nn.onednn import RecurrentProduct, onednn_runs, pad_rows, training_rows
from rnmt.nn.rnn import RNN, Stepper
from rnmt.nn.scratch import ScratchBuffer
from rnmt.precision import cpu_has_bf16_units, cpu_training_products
from rnmt.training import precision_context
from rnmt.vocab import EOS, PAD

needs_bf16_units = pytest.mark.skipif(
    not (cpu_has_bf16_units() and onednn_runs(torch.bfloat16)),
    reason="this CPU has no bf16 matrix units (AMX or AVX512-BF16) for oneDNN")


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


@pytest.mark.parametrize("rows,size", [(1, 8), (8, 8), (66, 72), (157, 160), (2996, 3072),
                                       (4096, 4096)])
def test_training_rows_pad_at_most_an_eighth(rows, size):
    assert training_rows(rows) == size
    assert training_rows(rows) - rows <= max(7, rows // 8)


def test_padded_rows_are_zero_rows_appended_in_the_asked_dtype():
    x = torch.arange(1.0, 31.0).view(5, 6)
    padded = pad_rows(x, torch.bfloat16)
    assert padded.shape == (8, 6) and padded.dtype == torch.bfloat16
    assert torch.equal(padded[:5].float(), x)  # small integers: exact in bf16
    assert not padded[5:].any()


def test_cpu_training_products_follow_autocast():
    x = torch.randn(3, 4, requires_grad=True)
    assert cpu_training_products(x) == torch.float32
    assert cpu_training_products(x.double()) is None  # the kernels are fp32 or bf16 only
    with torch.no_grad():
        assert cpu_training_products(x) is None  # inference has its own layers
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = torch.bfloat16 if cpu_has_bf16_units() else None
        assert cpu_training_products(x) == expected
    with torch.autocast("cpu", dtype=torch.float16):
        assert cpu_training_products(x) is None


@needs_bf16_units
def test_a_bf16_recurrent_product_multiplies_in_bf16_and_gives_fp32_gradients():
    """h_t = tanh(x_t Wᵀ + h_{t-1}) over 5 steps of 19 rows (padded to 32 inside): the
    outputs and the gradients of x, h_0 and W are fp32 and those of the fp32 product to
    bf16 precision, but not equal to them (the products did run in bf16)."""
    torch.manual_seed(0)
    weight = torch.randn(40, 40, requires_grad=True)
    xs = torch.randn(5, 19, 40, requires_grad=True)
    h0 = torch.randn(19, 40, requires_grad=True)
    results = []
    for dtype in (torch.bfloat16, torch.float32):
        results.append(through_recurrence(RecurrentProduct(weight * 0.2, dtype), xs, h0,
                                          weight))
    (out, grads), (expected, expected_grads) = results
    assert out.dtype == torch.float32 and all(g.dtype == torch.float32 for g in grads)
    assert 0 < _relative_error(out, expected) < 1e-2
    for got, want in zip(grads, expected_grads):
        assert got.shape == want.shape
        assert 0 < _relative_error(got, want) < 2e-2


@needs_bf16_units
@pytest.mark.parametrize("epsilon", [0.0, 0.1])
def test_the_bf16_vocabulary_loss_is_the_fp32_loss_to_bf16_precision(epsilon):
    torch.manual_seed(0)
    n, dim, vocab = 37, 24, 45  # 37 rows padded to 256, 45 columns to 48
    o = torch.randn(n, dim, requires_grad=True)
    weight = torch.randn(vocab, dim, requires_grad=True)
    bias = torch.randn(vocab, requires_grad=True)
    target = torch.randint(1, vocab, (n,))
    target[3] = PAD
    results = []
    for products in (torch.bfloat16, torch.float32):
        loss, nll = VocabularyLoss.apply(o, weight, bias, target, epsilon, PAD,
                                         ScratchBuffer(), products)
        results.append((loss, nll, torch.autograd.grad(loss, (o, weight, bias))))
    (loss, nll, grads), (want_loss, want_nll, want_grads) = results
    assert 0 < abs(loss.item() - want_loss.item()) < 1e-2 * want_loss.item()
    assert abs(nll.item() - want_nll.item()) < 1e-2 * want_nll.item()
    for got, want in zip(grads, want_grads):
        assert got.shape == want.shape and got.dtype == torch.float32
        assert _relative_error(got, want) < 2e-2


@needs_bf16_units
def test_bf16_training_takes_the_cpu_kernels_and_gives_the_fp32_gradients(monkeypatch):
    """A Bahdanau model's loss under `precision_context("bf16")`: its decoder steps and its
    attention take the CPU kernels, the vocabulary loss its fused path, and every
    parameter's gradient is fp32 and the fp32 run's to bf16 precision."""
    torch.manual_seed(0)
    config = ModelConfig(src_vocab_size=37, tgt_vocab_size=37, emb_dim=32, hidden_dim=32,
                         dec_hidden_dim=48, attn_dim=24, output_dim=40, dropout=0.0,
                         attention="bahdanau")
    model = build_model(config).train()
    src = torch.tensor([[5, 6, 7, 8, EOS], [9, 10, EOS, 0, 0], [11, EOS, 0, 0, 0]])
    tgt_in = torch.tensor([[2, 4, 5, 6], [2, 7, 8, 0], [2, 9, 0, 0]])
    tgt_out = torch.tensor([[4, 5, 6, EOS], [7, 8, EOS, 0], [9, EOS, 0, 0]])
    real = (tgt_out.view(-1) != PAD).nonzero().squeeze(1)
    fast: list[tuple[str, bool]] = []
    for kind in (Stepper, AttentionSteps):
        build = kind.__init__

        def recording(self, *args, _build=build, _name=kind.__name__, **kwargs):
            _build(self, *args, **kwargs)
            fast.append((_name, self.fast))

        monkeypatch.setattr(kind, "__init__", recording)
    results = []
    for precision in ("bf16", "fp32"):
        model.zero_grad()
        with precision_context(precision, torch.device("cpu")):
            loss, _ = model(src, torch.tensor([5, 3, 2]), tgt_in, positions=real,
                            targets=tgt_out.view(-1)[real])
        if precision == "bf16":
            assert model.logit_buffer._storage is not None  # `VocabularyLoss` ran
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    assert fast == [("Stepper", True), ("AttentionSteps", True)] * 2
    (loss, grads), (want_loss, want_grads) = results
    assert loss.dtype == torch.float32
    assert 0 < abs(loss.item() - want_loss.item()) < 1e-2 * want_loss.item()
    got = torch.cat([g.flatten() for g in grads.values()])
    want = torch.cat([want_grads[name].flatten() for name in grads])
    assert all(g.dtype == torch.float32 for g in grads.values())
    assert _relative_error(got, want) < 2e-2


@needs_bf16_units
def test_the_bf16_encoder_lstm_runs_at_bucketed_shapes_and_computes_the_same(monkeypatch):
    """In bf16 training the encoder's LSTM layer (`lstm_layer_bf16`) sees 8 rows and a
    multiple of 8 steps for a batch of 5 × 11 (oneDNN keeps one kernel per shape); the
    outputs, final states and gradients are the fp32 packed LSTM's to bf16 precision,
    whatever the extra rows and steps held."""
    torch.manual_seed(0)
    rnn = RNN("lstm", 6, 5, 1, True).train()
    lengths = torch.tensor([11, 1, 4, 9, 2])
    x = torch.randn(5, 11, 6)
    seen: list[tuple[int, ...]] = []

    def recording(inputs, *args):
        seen.append(tuple(inputs.shape))
        return lstm_layer_bf16(inputs, *args)

    results = []
    for precision in ("bf16", "fp32"):
        x_leaf = x.clone().requires_grad_()
        if precision == "bf16":
            with monkeypatch.context() as patch, precision_context("bf16", torch.device("cpu")):
                patch.setattr(rnn_module, "lstm_layer_bf16", recording)
                out, (h, c) = rnn(x_leaf, lengths)
        else:
            out, (h, c) = rnn._packed_forward(x_leaf, lengths, None)
        gen = torch.Generator().manual_seed(7)
        loss = sum((t.float() * torch.randn(t.shape, generator=gen)).sum() for t in (out, h, c))
        grads = torch.autograd.grad(loss, [x_leaf, *rnn.parameters()])
        results.append(([out.float(), h.float(), c.float()], grads))
    assert seen == [(8, 16, 6), (8, 16, 6)]  # both directions
    (got, got_grads), (want, want_grads) = results
    assert [t.shape for t in got] == [t.shape for t in want] == [(5, 11, 10), (2, 5, 5), (2, 5, 5)]
    for a, b in zip(got, want):
        assert _relative_error(a, b) < 2e-2
    for a, b in zip(got_grads, want_grads):
        assert a.dtype == torch.float32 and _relative_error(a, b) < 3e-2


@needs_bf16_units
def test_the_bf16_lstm_layer_is_torchs_lstm_to_bf16_precision_and_holds_padding_inert():
    """`lstm_layer_bf16` from an initial state over rows padded after their lengths: the
    outputs at real positions, the last c (that of each row's last real position) and the
    gradients of x, h0, c0 and every weight are the fp32 torch LSTM's over each row's real
    part, to bf16 precision; the padding's inputs get no gradient."""
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(6, 5, batch_first=True)
    lengths = [7, 3, 1]
    x = torch.randn(3, 7, 6, requires_grad=True)
    h0, c0 = (torch.randn(3, 5, requires_grad=True) for _ in range(2))
    weights = [lstm.weight_ih_l0, lstm.weight_hh_l0, lstm.bias_ih_l0, lstm.bias_hh_l0]
    padded = torch.arange(7)[None, :] >= torch.tensor(lengths)[:, None]
    out, c = lstm_layer_bf16(x, padded, (h0, c0), *weights)
    assert out.dtype == torch.bfloat16 and c.dtype == torch.float32
    gen = torch.Generator().manual_seed(1)
    g_out, g_c = torch.randn(3, 7, 5, generator=gen), torch.randn(3, 5, generator=gen)
    loss = (out.float() * g_out * ~padded.unsqueeze(-1)).sum() + (c * g_c).sum()
    got = torch.autograd.grad(loss, [x, h0, c0, *weights])
    want_out, want_c, want_loss = [], [], 0.0
    for row, n in enumerate(lengths):
        o, (_, c_n) = lstm(x[row : row + 1, :n], (h0[None, row : row + 1], c0[None, row : row + 1]))
        want_out.append(o[0])
        want_c.append(c_n[0, 0])
        want_loss = want_loss + (o[0] * g_out[row, :n]).sum() + (c_n[0, 0] * g_c[row]).sum()
    want = torch.autograd.grad(want_loss, [x, h0, c0, *weights])
    for row, n in enumerate(lengths):
        assert _relative_error(out[row, :n].float(), want_out[row]) < 2e-2
    assert _relative_error(c, torch.stack(want_c)) < 2e-2
    assert torch.all(got[0][padded] == 0)
    for a, b in zip(got, want):
        assert a.dtype == torch.float32 and _relative_error(a, b) < 3e-2
