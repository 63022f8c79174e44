"""The attentive encoder-decoder: padding, the step protocol, and learning."""

from __future__ import annotations

import torch

from rnmt.models import ModelConfig, build_model
from rnmt.vocab import EOS

SMALL = dict(emb_dim=16, hidden_dim=16, dec_hidden_dim=24, attn_dim=12, output_dim=20,
             dropout=0.0)


def _model(**overrides):
    torch.manual_seed(0)
    config = ModelConfig(src_vocab_size=30, tgt_vocab_size=25, **{**SMALL, **overrides})
    return build_model(config).eval().double()


def test_padding_never_changes_an_encoding():
    model = _model()
    sentences = [torch.tensor([5, 6, 7, 8, EOS]), torch.tensor([9, 10, EOS]),
                 torch.tensor([11, EOS])]
    batch = torch.zeros(3, 5, dtype=torch.long)
    for i, s in enumerate(sentences):
        batch[i, : len(s)] = s
    lengths = torch.tensor([len(s) for s in sentences])
    batched = model.encode(batch, lengths)
    for i, s in enumerate(sentences):
        alone = model.encode(s.unsqueeze(0), torch.tensor([len(s)]))
        torch.testing.assert_close(batched.memory[i, : len(s)], alone.memory[0])
        torch.testing.assert_close(batched.keys[i, : len(s)], alone.keys[0])
        for layer_b, layer_a in zip(batched.final, alone.final):
            torch.testing.assert_close(layer_b[i], layer_a[0])


def test_padding_never_changes_the_next_word_distribution():
    model = _model()
    src = torch.tensor([[5, 6, 7, EOS], [8, EOS, 0, 0]])
    lengths = torch.tensor([4, 2])
    tgt = torch.tensor([[2, 4, 5], [2, 6, 0]])
    batched = torch.log_softmax(model(src, lengths, tgt), -1)
    alone = torch.log_softmax(model(src[1:, :2], lengths[1:], tgt[1:, :2]), -1)
    torch.testing.assert_close(batched[1, :2], alone[0])


def test_step_by_step_decoding_equals_teacher_forcing():
    for attention in ("bahdanau", "general"):
        model = _model(attention=attention)
        src = torch.tensor([[5, 6, 7, EOS], [8, 9, EOS, 0]])
        lengths = torch.tensor([4, 3])
        tgt = torch.tensor([[2, 4, 5, 6], [2, 7, 8, 9]])
        forced = torch.log_softmax(model(src, lengths, tgt), -1)
        enc = model.encode(src, lengths)
        state = model.init_state(enc)
        for t in range(tgt.size(1)):
            log_probs, state, _ = model.step(tgt[:, t], state, enc)
            torch.testing.assert_close(log_probs, forced[:, t])


def test_vanilla_seq2seq_runs_the_protocol():
    model = _model(arch="seq2seq")
    src = torch.tensor([[5, 6, 7, EOS]])
    enc = model.encode(src, torch.tensor([4]))
    log_probs, state, attn = model.step(torch.tensor([2]), model.init_state(enc), enc)
    assert log_probs.shape == (1, 25) and attn is None
    assert torch.allclose(log_probs.exp().sum(-1), torch.ones(1, dtype=torch.float64))
