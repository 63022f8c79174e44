"""Greedy and beam search against the model protocol."""

from __future__ import annotations

import torch

from rnmt.models import ModelConfig, build_model
from rnmt.search import SearchConfig, beam_search, greedy_search
from rnmt.vocab import EOS


def _model(seed: int):
    torch.manual_seed(seed)
    config = ModelConfig(src_vocab_size=40, tgt_vocab_size=30, emb_dim=16, hidden_dim=16,
                         dec_hidden_dim=24, attn_dim=12, output_dim=20, dropout=0.0)
    return build_model(config).eval()


def _batch(seed: int, n: int = 12):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 9, (n,), generator=g)
    src = torch.zeros(n, int(lengths.max()), dtype=torch.long)
    for i, length in enumerate(lengths.tolist()):
        src[i, : length - 1] = torch.randint(4, 40, (length - 1,), generator=g)
        src[i, length - 1] = EOS
    return src, lengths


def _forced_score(model, src, lengths, tokens):
    """log p(tokens + </s> | src) by teacher forcing."""
    tgt = torch.tensor([[2] + tokens])
    gold = torch.tensor(tokens + [EOS])
    log_probs = torch.log_softmax(model(src, lengths, tgt), -1)[0]
    return float(log_probs[torch.arange(len(gold)), gold].sum())


def test_beam_of_one_equals_greedy():
    for seed in range(3):
        model = _model(seed)
        src, lengths = _batch(seed)
        config = SearchConfig(beam=1, max_len_a=1.0, max_len_b=5)
        greedy = greedy_search(model, src, lengths, config)
        beam = beam_search(model, src, lengths, config)
        assert [h.tokens for h in greedy] == [hyps[0].tokens for hyps in beam]
        for g, b in zip(greedy, beam):
            assert abs(g.score - b[0].score) < 1e-4


def test_beam_scores_are_the_model_scores_of_their_outputs():
    model = _model(4)
    src, lengths = _batch(4, n=5)
    hyps = beam_search(model, src, lengths, SearchConfig(beam=4, max_len_b=6))
    for i, sentence in enumerate(hyps):
        assert len(sentence) == 4
        for hyp in sentence:
            if len(hyp.tokens) + 1 < int(1.5 * lengths[i]) + 6:  # ended by </s>, not the limit
                forced = _forced_score(model, src[i : i + 1, : lengths[i]], lengths[i : i + 1],
                                       hyp.tokens)
                assert abs(forced - hyp.score) < 1e-4


def test_beam_search_finds_at_least_greedys_score_when_unnormalised():
    model = _model(5)
    src, lengths = _batch(5)
    config = SearchConfig(beam=5, length_penalty=0.0)
    greedy = greedy_search(model, src, lengths, config)
    beam = beam_search(model, src, lengths, config)
    for g, b in zip(greedy, beam):
        assert b[0].score >= g.score - 1e-5


def test_output_is_the_same_whatever_the_batch():
    model = _model(6)
    src, lengths = _batch(6)
    config = SearchConfig(beam=3)
    together = beam_search(model, src, lengths, config)
    for i in range(len(src)):
        alone = beam_search(model, src[i : i + 1, : lengths[i]], lengths[i : i + 1], config)
        assert alone[0][0].tokens == together[i][0].tokens


def test_output_length_respects_the_limit():
    model = _model(7)
    src, lengths = _batch(7)
    config = SearchConfig(beam=3, max_len_a=0.0, max_len_b=3)
    for search in (greedy_search, beam_search):
        for out in search(model, src, lengths, config):
            hyp = out[0] if isinstance(out, list) else out
            assert len(hyp.tokens) <= 2  # 3 positions, the last one </s>
