"""The CPU training paths of the fused LSTM compute what the plain paths compute: the
dense kernel with padding held inert (what the packed-sequence path gives) and the
teacher-forced `Stepper` on oneDNN (what `RNN.step` gives): outputs and gradients."""

from __future__ import annotations

import pytest
import torch

from conftest import through_recurrence
from rnmt.models import ModelConfig, build_model
from rnmt.nn.lstm_steps import LSTMSteps
from rnmt.nn.onednn import RecurrentProduct, onednn_available, onednn_runs
from rnmt.nn.rnn import RNN, Stepper
from rnmt.vocab import EOS


def _both_paths(rnn: RNN, x: torch.Tensor, lengths: torch.Tensor, state):
    """(outputs, h, c) and the gradients of a fixed random function of them, for the
    dense path (`rnn(...)` with autograd on the CPU) and the packed one."""
    results = []
    for run in (lambda *a: rnn(*a), rnn._packed_forward):
        x_leaf = x.clone().requires_grad_()
        out, (h, c) = run(x_leaf, lengths, state)
        gen = torch.Generator().manual_seed(7)
        loss = sum((t * torch.randn(t.shape, generator=gen, dtype=t.dtype)).sum()
                   for t in (out, h, c))
        grads = torch.autograd.grad(loss, [x_leaf, *rnn.parameters()])
        results.append(((out, h, c), grads))
    return results


@pytest.mark.parametrize("bidirectional,layers,with_state",
                         [(True, 2, False), (False, 1, True), (True, 1, True)])
def test_dense_lstm_training_path_equals_packed_lstm(bidirectional, layers, with_state):
    torch.manual_seed(0)
    rnn = RNN("lstm", 6, 5, layers, bidirectional).double().eval()  # eval: no dropout
    lengths = torch.tensor([7, 1, 4, 7, 2])
    x = torch.randn(5, 7, 6, dtype=torch.double)
    state = None
    if with_state:
        shape = (layers * (2 if bidirectional else 1), 5, 5)
        state = (torch.randn(shape, dtype=torch.double), torch.randn(shape, dtype=torch.double))
    (dense, dense_grads), (packed, packed_grads) = _both_paths(rnn, x, lengths, state)
    for a, b in zip(dense, packed):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    for a, b in zip(dense_grads, packed_grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_padding_leaves_the_dense_lstm_state_bit_for_bit_unchanged():
    """σ(±SATURATE) is exactly 1 and 0 in fp32, so nothing in the padding can move the
    state: the short row's final state is the same, bit for bit, whatever its padding
    holds, and equals the packed path's."""
    torch.manual_seed(1)
    rnn = RNN("lstm", 4, 3, 1, True).eval()
    batch = torch.randn(2, 12, 4) * 10  # large inputs: gates far from zero
    lengths = torch.tensor([3, 12])
    other = batch.clone()
    other[0, 3:] = torch.randn(9, 4) * 100
    out, (h, c) = rnn(batch, lengths)
    _, (h_other, c_other) = rnn(other, lengths)
    assert torch.equal(h[:, 0], h_other[:, 0]) and torch.equal(c[:, 0], c_other[:, 0])
    assert torch.equal(out[0, 3:], torch.zeros(9, 6))
    with torch.no_grad():
        _, (h_packed, c_packed) = rnn._packed_forward(batch, lengths, None)
    torch.testing.assert_close(c, c_packed)
    torch.testing.assert_close(h, h_packed)


needs_onednn = pytest.mark.skipif(not onednn_available(), reason="torch built without oneDNN")


@needs_onednn
def test_recurrent_product_gives_the_matmul_and_its_gradients_over_a_recurrence():
    """h_t = tanh(x_t Wᵀ + h_{t-1}) for 5 steps: outputs and the gradients of x, h_0 and W
    as plain autograd gives them, with W's gradient formed once after all steps."""
    torch.manual_seed(0)
    weight = torch.randn(6, 6, requires_grad=True)
    xs = torch.randn(5, 3, 6, requires_grad=True)
    h0 = torch.randn(3, 6, requires_grad=True)
    results = []
    for product in (RecurrentProduct(weight * 1.0), lambda x: x @ (weight * 1.0).t()):
        results.append(through_recurrence(product, xs, h0, weight))
    (out, grads), (expected, expected_grads) = results
    torch.testing.assert_close(out, expected)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _lstm_steps(step, xs, h, c, steps_used):
    """h_t, c_t over the steps of xs (steps, rows, rest) from `step(t, x_t, h, c)`, and the
    gradients (of xs, h_0, c_0 and the extra leaves) of a fixed function of the first
    `steps_used` steps' h_t and c_t."""
    hs, cs = [], []
    for t, x in enumerate(xs.unbind(0)):
        h, c = step(t, x, h, c)
        hs.append(h)
        cs.append(c)
    out = torch.stack(hs[:steps_used] + cs[:steps_used])
    return out, (out * torch.linspace(-1, 2, out.size(-1))).sum()


@needs_onednn
@pytest.mark.parametrize("dtype,steps_used", [(torch.float32, 5), (torch.float32, 3),
                                              (torch.bfloat16, 5), (torch.bfloat16, 3)])
def test_lstm_steps_give_the_lstm_equations_and_their_gradients(dtype, steps_used):
    """`LSTMSteps` (gates and gradients by hand, products on oneDNN, buffers shared by the
    pass) against the LSTM equations through autograd: h_t, c_t and the gradients of x_t,
    h_0, c_0, W and pre. With steps_used < 5 the last steps' backward never runs, and they
    must add nothing. In bf16 (the products only) to bf16 precision."""
    if dtype == torch.bfloat16 and not onednn_runs(dtype):
        pytest.skip("no bf16 kernels in oneDNN here")
    torch.manual_seed(0)
    steps, rows, rest, hidden = 5, 19, 6, 7
    weight = (torch.randn(4 * hidden, rest + hidden) * 0.5).requires_grad_()
    pre = torch.randn(steps, rows, 4 * hidden, requires_grad=True)
    xs = torch.randn(steps, rows, rest, requires_grad=True)
    h0 = torch.randn(rows, hidden, requires_grad=True)
    c0 = torch.randn(rows, hidden, requires_grad=True)
    leaves = [xs, h0, c0, weight, pre]

    def plain(t, x, h, c):
        i, f, g, o = (pre[t] + torch.cat([x, h], 1) @ weight.t()).chunk(4, 1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c

    fused = LSTMSteps(weight, pre, dtype)
    out, loss = _lstm_steps(fused.step, xs, h0, c0, steps_used)
    grads = torch.autograd.grad(loss, leaves)
    expected, expected_loss = _lstm_steps(plain, xs, h0, c0, steps_used)
    expected_grads = torch.autograd.grad(expected_loss, leaves)
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else \
        {"rtol": 0.0, "atol": 3e-2 * float(expected.abs().max())}
    torch.testing.assert_close(out, expected, **tolerance)
    assert not torch.equal(out, expected) or dtype == torch.float32
    for name, got, want in zip(["x", "h0", "c0", "W", "pre"], grads, expected_grads):
        assert got.dtype == torch.float32, name
        scale = float(want.abs().max())
        torch.testing.assert_close(got, want, rtol=tolerance["rtol"],
                                   atol=tolerance["atol"] if dtype == torch.float32
                                   else 3e-2 * scale, msg=name)
    unused = slice(steps_used, steps)
    assert torch.count_nonzero(grads[0][unused]) == 0  # x_t of steps never used
    assert torch.count_nonzero(grads[4][unused]) == 0  # pre_t likewise


@needs_onednn
@pytest.mark.parametrize("attention,layers,input_feeding",
                         [("bahdanau", 1, False), ("bahdanau", 2, False), ("general", 2, True)])
def test_cpu_training_fast_path_gives_the_gradients_of_the_plain_steps(attention, layers,
                                                                       input_feeding,
                                                                       monkeypatch):
    """The decoder's teacher-forced steps in fp32 on the CPU take `Stepper`'s fast path
    (oneDNN products, the embeddings' share precomputed); with oneDNN switched off they
    are plain `RNN.step`s. Same loss, same gradients for every parameter."""
    torch.manual_seed(0)
    config = ModelConfig(src_vocab_size=30, tgt_vocab_size=25, emb_dim=16, hidden_dim=16,
                         dec_hidden_dim=24, attn_dim=12, output_dim=20, dropout=0.0,
                         attention=attention, dec_layers=layers, input_feeding=input_feeding)
    model = build_model(config).train()
    src = torch.tensor([[5, 6, 7, 8, EOS], [9, 10, EOS, 0, 0], [11, EOS, 0, 0, 0]])
    tgt = torch.tensor([[2, 4, 5, 6], [2, 7, 8, 0], [2, 9, 0, 0]])
    # Which path each forward took: the model's own Steppers, as built.
    paths: list[bool] = []
    build = Stepper.__init__

    def recording(self, *args, **kwargs):
        build(self, *args, **kwargs)
        paths.append(self.fast)

    monkeypatch.setattr(Stepper, "__init__", recording)
    results = []
    for onednn in (True, False):
        model.zero_grad()
        with torch.backends.mkldnn.flags(enabled=onednn):
            loss = model(src, torch.tensor([5, 3, 2]), tgt).log_softmax(-1)[..., 3].sum()
            loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    assert paths == [True, False]  # fast with oneDNN, plain steps without
    (loss, grads), (expected_loss, expected_grads) = results
    torch.testing.assert_close(loss, expected_loss)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-4, atol=1e-5, msg=name)


def test_the_onednn_check_draws_nothing_from_the_global_generator():
    """Training asks for it at its first forward pass (after a resume, mid-run): a random
    draw there would shift the dropout stream and break exact resumption."""
    state = torch.get_rng_state()
    onednn_available.__wrapped__()  # uncached
    assert torch.equal(torch.get_rng_state(), state)


def test_the_onednn_check_is_not_fooled_by_autocast():
    """Its first call can come under `--precision bf16`'s autocast, which would round the
    fp32 reference product and report oneDNN as wrong for the rest of the process."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = onednn_available.__wrapped__()
    assert under_autocast == onednn_available.__wrapped__()
