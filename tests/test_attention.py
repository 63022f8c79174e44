"""The attention scores against the papers' formulas, written out from the parameters."""

from __future__ import annotations

import copy

import pytest
import torch

from rnmt.nn.attention import Attention, AttentionSteps
from rnmt.nn.onednn import onednn_runs


def _inputs(batch: int = 3, steps: int = 4, src_len: int = 6, dim: int = 10):
    torch.manual_seed(0)
    query = torch.randn(batch, steps, dim, dtype=torch.float64)
    memory = torch.randn(batch, src_len, dim, dtype=torch.float64)
    mask = torch.ones(batch, src_len, dtype=torch.bool)
    mask[1, 4:] = False
    mask[2, 2:] = False
    return query, memory, mask


def _expected_weights(attention: Attention, query, memory, mask):
    if attention.additive:
        # Bahdanau et al. 2015, eq. 6: e_tj = vᵀ tanh(W_q q_t + W_k h_j), with tanh itself.
        hidden = torch.tanh(attention.query_proj(query).unsqueeze(2)
                            + attention.key_proj(memory).unsqueeze(1))
        scores = hidden @ attention.v.weight.squeeze(0)
    elif attention.score == "general":
        scores = query @ attention.key_proj(memory).transpose(1, 2)
    else:
        scores = query @ memory.transpose(1, 2)
    return torch.softmax(scores.masked_fill(~mask.unsqueeze(1), float("-inf")), dim=-1)


@pytest.mark.parametrize("score", ["bahdanau", "concat", "general", "dot"])
def test_weights_and_context_follow_the_papers_formulas(score):
    query, memory, mask = _inputs()
    attention = Attention(score, 10, 10, 8).double()
    with torch.no_grad():  # weights of a trained size, so tanh leaves its linear range
        for p in attention.parameters():
            p.normal_(0.0, 1.0)
    context, weights = attention(query, attention.keys(memory), memory, mask)
    expected = _expected_weights(attention, query, memory, mask)
    torch.testing.assert_close(weights, expected, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(context, expected @ memory, rtol=1e-9, atol=1e-12)
    assert (weights[1, :, 4:] == 0).all() and (weights[2, :, 2:] == 0).all()


def test_one_step_rows_per_memory_match_the_multi_step_form():
    """Beam search passes (batch * m, dim) query rows, m per memory: same weights."""
    query, memory, mask = _inputs()
    attention = Attention("bahdanau", 10, 10, 8).double()
    keys = attention.keys(memory)
    context, weights = attention(query, keys, memory, mask)
    flat_context, flat_weights = attention(query.flatten(0, 1), keys, memory, mask)
    torch.testing.assert_close(flat_weights, weights.flatten(0, 1))
    torch.testing.assert_close(flat_context, context.flatten(0, 1))


def test_search_computes_the_additive_scores_a_few_sentences_at_a_time(monkeypatch):
    """Without autograd, on a CPU, the activation runs in chunks of at most ADDITIVE_CHUNK
    elements: 4 steps × 6 source positions × 8 = 192 per sentence, so a chunk of 400 holds
    2 sentences, and a sentence larger than a chunk still goes whole."""
    import rnmt.nn.attention as attention_module

    query, memory, mask = _inputs()
    attention = Attention("bahdanau", 10, 10, 8).double()
    keys = attention.keys(memory)
    whole = attention(query, keys, memory, mask)  # autograd on: never chunked
    part = attention._additive_part
    for chunk in (400, 10):  # 2 sentences a chunk; then less than one sentence
        monkeypatch.setattr(attention_module, "ADDITIVE_CHUNK", chunk)
        calls = []
        monkeypatch.setattr(attention, "_additive_part",
                            lambda q, k: calls.append(q.size(0)) or part(q, k))
        with torch.no_grad():
            chunked = attention(query, keys, memory, mask)
        assert calls == ([2, 1] if chunk == 400 else [1, 1, 1])
        for a, b in zip(chunked, whole):
            torch.testing.assert_close(a, b.detach())


@pytest.mark.parametrize("steps", [1, 4])  # one decoder step (Bahdanau), all steps (Luong)
def test_training_gradients_of_the_additive_score_are_the_papers_formulas(steps):
    """With autograd on, the additive score runs a hand-written backward: the gradients of
    the query, the memory and every parameter equal autograd's through vᵀtanh(W_q q + W_k h)."""
    query, memory, mask = _inputs(steps=steps)
    attention = Attention("bahdanau", 10, 10, 8).double()
    with torch.no_grad():
        for p in attention.parameters():
            p.normal_(0.0, 1.0)
    weights_of = {
        "hand-written": lambda q, m: attention(q, attention.keys(m), m, mask)[1],
        "autograd": lambda q, m: _expected_weights(attention, q, m, mask),
    }
    grads = {}
    for name, weights in weights_of.items():
        q, m = query.clone().requires_grad_(), memory.clone().requires_grad_()
        loss = (weights(q, m) * torch.arange(6.0, dtype=torch.float64)).sum()
        grads[name] = torch.autograd.grad(loss, [q, m, *attention.parameters()])
    for got, want in zip(grads["hand-written"], grads["autograd"]):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def _step_through(attention: Attention, query, memory, mask):
    """Every step t of a teacher-forced pass, as a decoder calls it: contexts and weights
    stacked (batch, steps, ·), and whether `AttentionSteps` took its CPU training path."""
    steps = AttentionSteps(attention, attention.keys(memory), memory, mask)
    outputs = [steps(query[:, t]) for t in range(query.size(1))]
    return (torch.stack([c for c, _ in outputs], 1), torch.stack([w for _, w in outputs], 1),
            steps.fast and (steps.query_product is not None) == onednn_runs(torch.float32))


@pytest.mark.parametrize("onednn", [True, False])
@pytest.mark.parametrize("score", ["bahdanau", "concat"])
def test_training_steps_on_the_cpu_give_the_gradients_of_the_plain_attention(score, onednn):
    """fp32 training on the CPU: the steps run `_AdditiveStep` (activations in the module's
    buffer, the memory's gradient summed at the end), their queries one `RecurrentProduct`
    (or, oneDNN switched off, `Linear` per step). Against `Attention.forward` step by step
    in float64: contexts, weights and the gradients of the query, the memory and every
    parameter, with a loss on the weights too (so both outputs carry a gradient)."""
    with torch.backends.mkldnn.flags(enabled=onednn):
        _check_training_steps(score)


def _check_training_steps(score: str) -> None:
    query, memory, mask = _inputs(steps=5)
    attention = Attention(score, 10, 10, 8)
    with torch.no_grad():
        for p in attention.parameters():
            p.normal_(0.0, 1.0)
    reference = copy.deepcopy(attention).double()
    position = torch.arange(6.0, dtype=torch.float64)
    results = []
    for module, dtype in ((attention, torch.float32), (reference, torch.float64)):
        q = query.to(dtype).requires_grad_()
        m = memory.to(dtype).requires_grad_()
        if dtype == torch.float64:
            outputs = [module(q[:, t], module.keys(m), m, mask) for t in range(q.size(1))]
            context = torch.stack([c for c, _ in outputs], 1)
            weights = torch.stack([w for _, w in outputs], 1)
        else:
            context, weights, fast = _step_through(module, q, m, mask)
            assert fast
        loss = (context.sin().sum() + (weights * position.to(dtype)).sum()) * 1.3
        grads = torch.autograd.grad(loss, [q, m, *module.parameters()])
        results.append([context, weights, *grads])
    for got, want in zip(*results):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
    assert (results[0][1][1, :, 4:] == 0).all() and (results[0][1][2, :, 2:] == 0).all()


def test_training_steps_of_two_passes_pending_in_one_graph_keep_apart():
    """Two passes in one graph, both backwards pending at once: each computes its steps'
    activations again from its own queries, so the gradient is the sum of the two passes'
    gradients taken one at a time."""
    query, memory, mask = _inputs(steps=3)
    attention = Attention("bahdanau", 10, 10, 8)
    q, m = query.float().requires_grad_(), memory.float()

    def loss_of(scale: float):
        context, weights, _ = _step_through(attention, q * scale, m, mask)
        return context.sum() + weights[..., 0].sum()

    def grad_of(scale: float) -> torch.Tensor:
        return torch.autograd.grad(loss_of(scale), q)[0]

    alone = grad_of(1.0) + grad_of(0.5)
    together = torch.autograd.grad(loss_of(1.0) + loss_of(0.5), q)[0]
    torch.testing.assert_close(together, alone)
