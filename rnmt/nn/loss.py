"""The training loss: the vocabulary layer's label-smoothed cross-entropy.

Label smoothing (Szegedy et al. 2016) trains on q = (1 − ε) · onehot(y) + ε · uniform(V):

    z_t = W_out o_t + b                                     logits, V of them
    log p = z_t − logsumexp(z_t)
    loss_t = (1 − ε) · (−log p(y_t)) + ε · (−(1/V) Σ_v log p(v))
    ∂loss_t/∂z_t = p − (1 − ε) · onehot(y_t) − ε/V

padding positions excluded; the loss reported to the user stays the real NLL −log p(y_t).

Two ways to the same numbers, which `vocabulary_loss` chooses between:

- `smoothed_token_loss(logits, …)` after the generator: autograd through `F.linear` and
  `F.cross_entropy` (GPU, bf16/fp16, evaluation).
- `VocabularyLoss`, one autograd node from o_t to the loss, for fp32 training on the CPU.
  The (n, V) products are the largest job of a training step of the reference model
  (n ≈ 3000 target pieces, V ≈ 4000), and autograd spends a third of that job on memory,
  not arithmetic: it allocates four (n, V) tensors per batch (logits, log-probabilities,
  and their gradients), 47 MB each. Allocations that large bypass glibc's heap (they are
  above its largest mmap threshold), so each one costs fresh zeroed pages from the kernel:
  20–30 ms of page faults apiece on the development machine, against 10 ms for the
  log-softmax itself. `VocabularyLoss` writes the logits into one buffer that the model
  keeps from batch to batch (`rnmt.nn.scratch.ScratchBuffer`), turns them into
  log-probabilities in place, and in the backward pass turns those, in place, into
  ∂loss/∂z. The buffer's width is V rounded up to a multiple of 16 (`PAD_COLUMNS`),
  because MKL multiplies (3000 × 512) @ (512 × 3968) in 104 ms but @ (512 × 3964) in
  131 ms; the extra columns have weight 0 and bias −inf, so their probability is exactly 0.

Measured on the development machine (AMD EPYC, 2 threads, fp32), n = 3000, o_t of size
512, V = 3964, forward + backward: `F.linear` + `F.cross_entropy` 451 ms, `VocabularyLoss`
with a fresh buffer 378 ms. Whole training steps of the reference model
(`benchmarks/train_speed.py`, old and new code in 7 interleaved pairs of processes, 15
batches each): median target tokens/s 1.05× (pairs from 0.96× to 1.17×), the processes'
system time 3.3 → 2.2 s, peak RSS about 50 MB lower.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rnmt.nn.onednn import biased_product, pad_rows
from rnmt.nn.scratch import ScratchBuffer
from rnmt.precision import cpu_autocast_off, cpu_training_products

PAD_COLUMNS = 16


def smoothed_token_loss(logits: Tensor, target: Tensor, epsilon: float, pad: int
                        ) -> tuple[Tensor, Tensor]:
    """Summed label-smoothed loss and summed NLL over the non-pad positions.

    Shapes: logits (..., V); target (...). The softmax runs in fp32 whatever the logits'
    precision. With ε = 0 both sums are the plain cross-entropy.
    """
    logits = logits.reshape(-1, logits.size(-1)).float()
    target = target.reshape(-1)
    if epsilon == 0.0:
        nll = F.cross_entropy(logits, target, ignore_index=pad, reduction="sum")
        return nll, nll.detach()
    log_probs = F.log_softmax(logits, dim=-1)
    keep = target != pad
    nll = -log_probs.gather(1, target.unsqueeze(1)).squeeze(1)
    uniform = -log_probs.mean(dim=-1)
    # where(), not [keep]: boolean selection would wait for the device to count `keep`.
    loss = torch.where(keep, (1.0 - epsilon) * nll + epsilon * uniform, 0.0).sum()
    return loss, torch.where(keep, nll, 0.0).sum().detach()


class VocabularyLoss(torch.autograd.Function):
    """(summed loss, summed NLL) of o (n, d) with targets y (n,) under the vocabulary layer
    W (V, d), b (V,) and label smoothing ε; targets equal to `pad` count for nothing. Only
    the loss has a gradient. One backward per forward: it consumes the buffer.

    `products`: the dtype of the three (n, V) products' operands, o's own by default; bf16
    for `--precision bf16` on a CPU with bf16 matrix units, where they run 4–10× faster
    than fp32. Then o, W and ∂loss/∂z are rounded to bf16 for the products (fp32
    accumulation), the logits to bf16 on the way out; the log-softmax, the loss, the
    gradients handed back and the bias stay in o's dtype.
    """

    @staticmethod
    def forward(ctx, o: Tensor, weight: Tensor, bias: Tensor, target: Tensor,  # type: ignore[override]
                epsilon: float, pad: int, buffer: ScratchBuffer,
                products: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
        vocab = weight.size(0)
        width = -(-vocab // PAD_COLUMNS) * PAD_COLUMNS
        if width > vocab:
            weight = torch.cat([weight, weight.new_zeros(width - vocab, weight.size(1))])
            bias = torch.cat([bias, bias.new_full((width - vocab,), float("-inf"))])
        log_p = buffer.take((o.size(0), width), o, ctx)
        rows = o.size(0)
        if products is None or products == o.dtype:
            torch.addmm(bias, o, weight.t(), out=log_p)
        else:
            o, weight = pad_rows(o, products), weight.to(products)
            log_p.copy_(biased_product(o, weight, bias)[:rows])
        # In place: the CPU kernel finishes each row's max and sum before writing the row.
        torch.log_softmax(log_p, 1, out=log_p)
        keep = target != pad
        nll = torch.where(keep, -log_p.gather(1, target.unsqueeze(1)).squeeze(1), 0.0).sum()
        loss = nll.clone()  # two outputs, two tensors: only the loss has a gradient
        if epsilon:
            uniform = torch.where(keep, -log_p[:, :vocab].sum(1) / vocab, 0.0).sum()
            loss = (1.0 - epsilon) * nll + epsilon * uniform
        ctx.save_for_backward(o, weight, log_p, target, keep)
        ctx.vocab, ctx.epsilon, ctx.buffer = vocab, epsilon, buffer
        ctx.out_dtype = log_p.dtype
        ctx.mark_non_differentiable(nll)
        return loss, nll

    @staticmethod
    def backward(ctx, grad_loss: Tensor, _: Tensor):  # type: ignore[override]
        o, weight, log_p, target, keep = ctx.saved_tensors
        vocab, epsilon = ctx.vocab, ctx.epsilon
        grad = log_p.exp_()  # p, in place
        grad.scatter_add_(1, target.unsqueeze(1),
                          grad.new_full((target.numel(), 1), epsilon - 1.0))
        if epsilon:
            grad[:, :vocab].sub_(epsilon / vocab)
        # ∂loss/∂z = grad_loss · (p - q) on kept rows. Where every row is kept (training
        # passes real positions only) the factor scales the three (·, d) and (V,) results
        # instead of the (n, V) tensor: one pass less over the step's largest tensor.
        factor = grad_loss
        if not bool(keep.all()):
            grad.mul_((keep.to(grad.dtype) * grad_loss).unsqueeze(1))
            factor = grad_loss.new_ones(())
        grad_bias = grad.sum(0)[:vocab].mul_(factor)
        rows = grad.size(0)
        # The products' dtype and rows: the same tensor in fp32, a copy in bf16.
        operand = grad if o.dtype == grad.dtype else pad_rows(grad, o.dtype)
        grad_o = (operand @ weight)[:rows].to(ctx.out_dtype).mul_(factor)
        grad_weight = (operand.t() @ o)[:vocab].to(ctx.out_dtype).mul_(factor)
        ctx.buffer.release()
        return grad_o, grad_weight, grad_bias, None, None, None, None, None


def vocabulary_loss(o: Tensor, generator: nn.Linear, target: Tensor, epsilon: float,
                    pad: int, buffer: ScratchBuffer) -> tuple[Tensor, Tensor]:
    """(summed loss, summed NLL) of the positions o (n, d) with targets (n,) under
    `generator` (d -> V): `VocabularyLoss` when training on the CPU in fp32, or in bf16
    with bf16 matrix units (`cpu_training_products`), else `smoothed_token_loss` on the
    generator's logits."""
    products = cpu_training_products(o)
    if products is not None:
        assert generator.bias is not None  # `output_layer`'s generators all have one
        with cpu_autocast_off():  # it chooses its products' dtype itself
            return VocabularyLoss.apply(o.float(), generator.weight, generator.bias, target,
                                        epsilon, pad, buffer, products)
    return smoothed_token_loss(generator(o), target, epsilon, pad)
