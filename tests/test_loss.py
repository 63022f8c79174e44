"""The training loss: the fused CPU vocabulary layer + cross-entropy against autograd through
`F.linear` and `F.cross_entropy`, its reused buffer, and the models' `targets=` path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rnmt.models import ModelConfig, build_model
from rnmt.nn.loss import VocabularyLoss, smoothed_token_loss
from rnmt.nn.scratch import ScratchBuffer
from rnmt.vocab import PAD


def _inputs(vocab: int, n: int = 20, dim: int = 8, seed: int = 0, pad: bool = True):
    torch.manual_seed(seed)
    o = torch.randn(n, dim, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(vocab, dim, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(vocab, dtype=torch.float64, requires_grad=True)
    target = torch.randint(1, vocab, (n,))
    if pad:
        target[3] = PAD  # counts for nothing
    return o, weight, bias, target


def _reference(o, weight, bias, target, epsilon):
    """Summed loss and NLL in float64 through torch's own ops."""
    logits = F.linear(o, weight, bias)
    loss = F.cross_entropy(logits, target, ignore_index=PAD, reduction="sum",
                           label_smoothing=epsilon)
    nll = F.cross_entropy(logits, target, ignore_index=PAD, reduction="sum")
    return loss, nll


@pytest.mark.parametrize("vocab", [37, 48])  # padded to 48 columns; already a multiple of 16
@pytest.mark.parametrize("epsilon", [0.0, 0.1])
@pytest.mark.parametrize("pad", [True, False])  # training's batches have no padded target
def test_fused_loss_and_gradients_equal_autograd_through_torch_ops(vocab, epsilon, pad):
    o, weight, bias, target = _inputs(vocab, pad=pad)
    loss, nll = _reference(o, weight, bias, target, epsilon)
    expected = torch.autograd.grad(1.7 * loss, (o, weight, bias))
    fused_loss, fused_nll = VocabularyLoss.apply(o, weight, bias, target, epsilon, PAD,
                                                 ScratchBuffer())
    assert not fused_nll.requires_grad
    got = torch.autograd.grad(1.7 * fused_loss, (o, weight, bias))
    torch.testing.assert_close(fused_loss, loss, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(fused_nll, nll, rtol=1e-12, atol=1e-10)
    for g, e in zip(got, expected):
        assert g.shape == e.shape
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


class _WatchedBuffer(ScratchBuffer):
    """Records, per forward, whether it was handed the shared storage."""

    def __init__(self) -> None:
        super().__init__()
        self.shared: list[bool] = []

    def take(self, shape, like, holder):
        lent = super().take(shape, like, holder)
        self.shared.append(lent.data_ptr() == self._storage.data_ptr())
        return lent


def test_the_buffer_is_reused_but_never_while_a_backward_still_needs_it():
    buffer = _WatchedBuffer()
    first, second = _inputs(37, seed=1), _inputs(37, n=15, seed=2)

    def fused(inputs):
        o, weight, bias, target = inputs
        return VocabularyLoss.apply(o, weight, bias, target, 0.1, PAD, buffer)[0]

    def check_gradients(inputs):
        want = torch.autograd.grad(_reference(*inputs, 0.1)[0], inputs[:3])
        for t, w in zip(inputs[:3], want):
            torch.testing.assert_close(t.grad, w, rtol=1e-10, atol=1e-12)
            t.grad = None

    # Two losses pending in one graph: the second forward must not overwrite the first's.
    (fused(first) + fused(second)).backward()
    assert buffer.shared == [True, False]
    check_gradients(first)
    check_gradients(second)

    # One after another, the storage serves each pass, even while the caller still holds
    # the last loss (a training loop does), with the same results as fresh.
    for inputs in (second, first, second):
        loss = fused(inputs)
        loss.backward()
        check_gradients(inputs)
    assert buffer.shared[2:] == [True, True, True]

    # A graph dropped without its backward (an error mid-batch) frees the buffer too.
    pending = fused(first)
    del pending, loss
    fused(second).backward()
    assert buffer.shared[5:] == [True, True]
    check_gradients(second)


@pytest.mark.parametrize("arch", ["attention", "lm"])
@pytest.mark.parametrize("epsilon", [0.0, 0.1])
def test_models_training_loss_equals_the_logits_path(arch, epsilon):
    """`model(…, targets=…)` (fused on the CPU in fp32) gives the loss, the NLL and every
    parameter gradient of `smoothed_token_loss` on `model(…, positions=…)`'s logits."""
    torch.manual_seed(0)
    config = ModelConfig(arch=arch, src_vocab_size=37, tgt_vocab_size=37, emb_dim=16,
                         hidden_dim=16, dec_hidden_dim=24, attn_dim=12, output_dim=20,
                         dropout=0.0)
    model = build_model(config)
    src = torch.tensor([[5, 6, 7, 8, 3], [9, 10, 3, 0, 0]])
    src_lengths = torch.tensor([5, 3])
    tgt_in = torch.tensor([[2, 4, 5, 6], [2, 7, 8, 0]])
    tgt_out = torch.tensor([[4, 5, 6, 3], [7, 8, 3, 0]])
    real = (tgt_out.view(-1) != PAD).nonzero().squeeze(1)
    targets = tgt_out.view(-1)[real]

    loss, nll = smoothed_token_loss(model(src, src_lengths, tgt_in, positions=real),
                                    targets, epsilon, PAD)
    expected = torch.autograd.grad(loss, list(model.parameters()))
    fused_loss, fused_nll = model(src, src_lengths, tgt_in, positions=real, targets=targets,
                                  label_smoothing=epsilon)
    assert model.logit_buffer._storage is not None  # the fused path ran
    got = torch.autograd.grad(fused_loss, list(model.parameters()))
    torch.testing.assert_close(fused_loss, loss)
    torch.testing.assert_close(fused_nll, nll)
    for (name, _), g, e in zip(model.named_parameters(), got, expected):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6, msg=name)
