"""Greedy and beam search against the model protocol."""

from __future__ import annotations

import dataclasses
import weakref

import torch

from rnmt.models import ModelConfig, build_model
import pytest

from rnmt.errors import ConfigError
from rnmt.models.ensemble import Ensemble
from rnmt.models.language_model import LanguageModel
import rnmt.search
from rnmt.search import (SearchConfig, beam_search, greedy_search, length_penalty,
                         sample_search, search_nbest, top_k_by_blocks)
from rnmt.vocab import EOS, UNK


def _model(seed: int, **architecture):
    torch.manual_seed(seed)
    config = ModelConfig(src_vocab_size=40, tgt_vocab_size=30, emb_dim=16, hidden_dim=16,
                         dec_hidden_dim=24, attn_dim=12, output_dim=20, dropout=0.0,
                         **architecture)
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
    return float(log_probs[torch.arange(len(gold)), gold].sum().detach())


@pytest.mark.parametrize("beam", [1, 3])
def test_search_lets_go_of_each_steps_log_probs_before_the_next_step(beam):
    """The (rows, vocab) log-probabilities of step t are freed before step t+1 runs, so
    that the allocator can hand their memory, still in the caches, to step t+1's."""
    model = _model(0)
    src, lengths = _batch(0)
    alive_at_next_step = []
    last: list[weakref.ref] = []
    real_step = model.step

    def step(prev, state, enc):
        if last:
            alive_at_next_step.append(last[0]() is not None)
        log_probs, state, attn = real_step(prev, state, enc)
        last[:] = [weakref.ref(log_probs)]
        return log_probs, state, attn

    model.step = step
    search_nbest(model, src, lengths, SearchConfig(beam=beam, max_len_b=6))
    assert len(alive_at_next_step) > 3 and not any(alive_at_next_step)


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


@pytest.mark.parametrize("max_len_a, max_len_b, limit_reached", [(1.5, 6, False),
                                                                  (0.0, 3, True)])
def test_beam_scores_are_the_model_scores_of_their_outputs(max_len_a, max_len_b,
                                                           limit_reached):
    """Every hypothesis, ended by </s> or by the length limit (the second case stops most
    of them there): its score is log p(y </s> | x) by teacher forcing."""
    model = _model(4)
    src, lengths = _batch(4, n=5)
    config = SearchConfig(beam=4, max_len_a=max_len_a, max_len_b=max_len_b)
    hyps = beam_search(model, src, lengths, config)
    at_limit = 0
    for i, sentence in enumerate(hyps):
        assert len(sentence) == 4
        for hyp in sentence:
            at_limit += len(hyp.tokens) + 1 == int(max_len_a * lengths[i] + max_len_b)
            forced = _forced_score(model, src[i : i + 1, : lengths[i]], lengths[i : i + 1],
                                   hyp.tokens)
            assert abs(forced - hyp.score) < 1e-4
    if limit_reached:
        assert at_limit > 0


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


def test_the_length_limit_grows_with_each_sentences_own_length():
    """max_len_a × |x| + max_len_b pieces, </s> included, |x| each sentence's own length
    (its </s> counted), not the padded batch's: with </s> held back by min_len, every
    output runs to exactly its limit."""
    model = _model(7)
    src, lengths = _batch(7)
    assert len(set(lengths.tolist())) > 2
    config = SearchConfig(beam=3, max_len_a=0.5, max_len_b=2, min_len=100)
    for search in (greedy_search, beam_search):
        for i, out in enumerate(search(model, src, lengths, config)):
            hyp = out[0] if isinstance(out, list) else out
            assert len(hyp.tokens) + 1 == int(0.5 * int(lengths[i]) + 2), (search, i)


def test_max_len_caps_the_output_whatever_a_and_b_say():
    """A model that is kept from ending (min_len) under a limit of a million × |x| pieces
    stops at --max-len, </s> included, in every search."""
    model = _model(7)
    src, lengths = _batch(7)
    config = SearchConfig(beam=3, max_len_a=1e6, max_len_b=0, max_len=6, min_len=100)
    for search in (greedy_search, beam_search):
        for out in search(model, src, lengths, config):
            hyp = out[0] if isinstance(out, list) else out
            assert len(hyp.tokens) + 1 == 6, search
    sampled = sample_search(model, src, lengths, dataclasses.replace(config, sample=True, seed=1))
    assert all(len(hyp.tokens) + 1 == 6 for hyp in sampled)


def _ngrams(tokens, n):
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def test_nbest_lists_are_sorted_and_score_what_forced_decoding_scores():
    model = _model(9)
    src, lengths = _batch(9, n=6)
    config = SearchConfig(beam=4, nbest=4, length_penalty=1.0, min_len=2)
    for i, hyps in enumerate(search_nbest(model, src, lengths, config)):
        assert len(hyps) == 4
        normalized = [h.normalized for h in hyps]
        assert normalized == sorted(normalized, reverse=True)
        for hyp in hyps:
            forced = _forced_score(model, src[i : i + 1, : lengths[i]], lengths[i : i + 1],
                                   hyp.tokens)
            assert abs(forced - hyp.score) < 1e-4
            assert abs(forced / length_penalty(len(hyp.tokens) + 1, 1.0) - hyp.normalized) < 1e-4


def test_nbest_beyond_the_beam_is_refused():
    with pytest.raises(ConfigError):
        SearchConfig(beam=2, nbest=3)


def test_min_len_holds_back_the_end_of_sentence():
    model = _model(8)
    src, lengths = _batch(8)
    for beam in (2, 3):  # (this untrained model's greedy path never ends before the limit)
        plain = search_nbest(model, src, lengths, SearchConfig(beam=beam, max_len_b=30))
        assert min(len(h[0].tokens) for h in plain) == 0
        min_len = min(len(h[0].tokens) for h in plain) + 3
        held = search_nbest(model, src, lengths, SearchConfig(beam=beam, min_len=min_len,
                                                              max_len_b=30))
        assert all(len(h[0].tokens) >= min_len for h in held)


def test_no_repeat_ngram_leaves_no_ngram_twice():
    model = _model(8)
    src, lengths = _batch(8)
    plain = greedy_search(model, src, lengths, SearchConfig(beam=1))
    assert any(len(set(_ngrams(h.tokens, 2))) < len(_ngrams(h.tokens, 2)) for h in plain)
    for beam in (1, 3):
        config = SearchConfig(beam=beam, no_repeat_ngram=2, min_len=6)
        for hyps in search_nbest(model, src, lengths, config):
            grams = _ngrams(hyps[0].tokens, 2)
            assert len(set(grams)) == len(grams)


def test_unk_penalty_moves_unk_in_and_out_of_the_output():
    model = _model(8)
    src, lengths = _batch(8)
    for beam in (1, 3):
        bonus = search_nbest(model, src, lengths, SearchConfig(beam=beam, unk_penalty=-5.0))
        assert any(UNK in h[0].tokens for h in bonus)
        penalty = search_nbest(model, src, lengths, SearchConfig(beam=beam, unk_penalty=50.0,
                                                                 min_len=3))
        assert not any(UNK in h[0].tokens for h in penalty)


def test_unnormalised_beam_search_stops_only_when_no_live_beam_can_win():
    """α = 0: a longer search (bigger length limit) can never find a better best."""
    model = _model(10)
    src, lengths = _batch(10)
    short = beam_search(model, src, lengths, SearchConfig(beam=3, length_penalty=0.0,
                                                          max_len_b=4))
    long = beam_search(model, src, lengths, SearchConfig(beam=3, length_penalty=0.0,
                                                         max_len_b=30))
    for s, lo in zip(short, long):
        assert lo[0].score >= s[0].score - 1e-5


def test_sampling_with_top_k_1_is_greedy_and_a_seed_repeats_the_draws():
    model = _model(11)
    src, lengths = _batch(11)
    greedy = greedy_search(model, src, lengths, SearchConfig(beam=1))
    top1 = sample_search(model, src, lengths, SearchConfig(sample=True, top_k=1, seed=0))
    assert [h.tokens for h in top1] == [h.tokens for h in greedy]
    nucleus = sample_search(model, src, lengths, SearchConfig(sample=True, top_p=1e-6, seed=0))
    assert [h.tokens for h in nucleus] == [h.tokens for h in greedy]
    config = SearchConfig(sample=True, seed=7, temperature=1.5, min_len=3)
    a = sample_search(model, src, lengths, config)
    b = sample_search(model, src, lengths, config)
    c = sample_search(model, src, lengths, SearchConfig(sample=True, seed=8, temperature=1.5,
                                                        min_len=3))
    assert [h.tokens for h in a] == [h.tokens for h in b]
    assert [h.tokens for h in a] != [h.tokens for h in c]


def test_samples_score_what_forced_decoding_scores():
    model = _model(12)
    src, lengths = _batch(12, n=5)
    hyps = sample_search(model, src, lengths, SearchConfig(sample=True, seed=1, top_k=5))
    for i, hyp in enumerate(hyps):
        forced = _forced_score(model, src[i : i + 1, : lengths[i]], lengths[i : i + 1],
                               hyp.tokens)
        assert abs(forced - hyp.score) < 1e-4


def test_a_forced_prefix_of_the_greedy_output_leaves_the_rest_unchanged():
    model = _model(13)
    src, lengths = _batch(13, n=6)
    config = SearchConfig(beam=1, min_len=5)
    full = greedy_search(model, src, lengths, config)
    cut = [min(2, len(h.tokens)) for h in full]
    prefix = torch.zeros(len(full), 2, dtype=torch.long)
    for i, h in enumerate(full):
        prefix[i, : cut[i]] = torch.tensor(h.tokens[: cut[i]])
    rest = greedy_search(model, src, lengths, config, prefix, torch.tensor(cut))
    for h, c, r in zip(full, cut, rest):
        # The limit counts from the end of the prefix, so the continuation may run longer.
        assert r.tokens[: len(h.tokens) - c] == h.tokens[c:]


def test_attention_is_carried_per_hypothesis_only_when_asked():
    model = _model(14)
    src, lengths = _batch(14, n=6)
    plain = beam_search(model, src, lengths, SearchConfig(beam=3))
    assert all(h.attention is None for hyps in plain for h in hyps)
    for search in (greedy_search, beam_search):
        found = search(model, src, lengths, SearchConfig(beam=3, attention=True))
        for i, out in enumerate(found):
            hyp = out[0] if isinstance(out, list) else out
            assert hyp.attention.shape == (len(hyp.tokens) + 1, int(lengths[i]))
            torch.testing.assert_close(hyp.attention.sum(-1),
                                       torch.ones(len(hyp.tokens) + 1))
    greedy = greedy_search(model, src, lengths, SearchConfig(beam=1, attention=True))
    beam1 = beam_search(model, src, lengths, SearchConfig(beam=1, attention=True))
    for g, b in zip(greedy, beam1):
        torch.testing.assert_close(g.attention, b[0].attention)


def test_an_ensemble_of_one_model_searches_like_the_model():
    model = _model(15)
    src, lengths = _batch(15)
    config = SearchConfig(beam=3, nbest=2)
    alone = search_nbest(model, src, lengths, config)
    ensemble = search_nbest(Ensemble([model]), src, lengths, config)
    assert [[h.tokens for h in s] for s in alone] == [[h.tokens for h in s] for s in ensemble]


# Members share a vocabulary, nothing else: each keeps its own encoder output and state.
MIXED_MEMBERS = [dict(), dict(cell="gru"), dict(attention="general", input_feeding=True),
                 dict(enc_layers=2, dec_layers=2), dict(arch="seq2seq", cell="rnn")]


@pytest.mark.parametrize("architectures", [[dict(), dict()], MIXED_MEMBERS],
                         ids=["two seeds", "five architectures"])
def test_an_ensemble_averages_its_members_log_probabilities(architectures):
    members = [_model(16 + k, **a) for k, a in enumerate(architectures)]
    ensemble = Ensemble(members)
    src, lengths = _batch(16, n=4)
    hyps = beam_search(ensemble, src, lengths, SearchConfig(beam=3))
    for i, sentence in enumerate(hyps):
        tokens = sentence[0].tokens
        s, n = src[i : i + 1, : lengths[i]], lengths[i : i + 1]
        tgt = torch.tensor([[2] + tokens])
        gold = torch.tensor(tokens + [EOS])
        mean = torch.stack([torch.log_softmax(m(s, n, tgt), -1) for m in members]).mean(0)
        expected = torch.log_softmax(mean, -1)[0, torch.arange(len(gold)), gold].sum()
        assert abs(float(expected.detach()) - sentence[0].score) < 1e-4
        assert abs(_forced_score(ensemble, s, n, tokens) - sentence[0].score) < 1e-4


def _language_model(seed: int) -> LanguageModel:
    torch.manual_seed(seed)
    config = ModelConfig(src_vocab_size=30, tgt_vocab_size=30, arch="lm", emb_dim=16,
                         dec_hidden_dim=24, dropout=0.0)
    return build_model(config).eval()


def test_a_language_model_continues_its_prefix_with_the_scores_of_forced_decoding():
    lm = _language_model(18)
    prefixes = [[5, 6, 7], [], [9]]
    lengths = torch.tensor([len(p) for p in prefixes])
    prefix = torch.zeros(3, 3, dtype=torch.long)
    for i, p in enumerate(prefixes):
        prefix[i, : len(p)] = torch.tensor(p, dtype=torch.long)
    src = torch.full((3, 1), EOS)  # read for its batch size only
    config = SearchConfig(sample=True, seed=3, min_len=2, max_len_b=8)
    hyps = sample_search(lm, src, torch.ones(3, dtype=torch.long), config, prefix, lengths)
    for p, hyp in zip(prefixes, hyps):
        tgt = torch.tensor([[2] + p + hyp.tokens])
        log_probs = torch.log_softmax(lm(src[:1], torch.ones(1), tgt), -1)[0]
        gold = torch.tensor(p + hyp.tokens + [EOS])
        per_piece = log_probs[torch.arange(len(gold)), gold]
        assert abs(float(per_piece[len(p):].sum()) - hyp.score) < 1e-4
        assert 2 <= len(hyp.tokens) <= 8


def test_asking_for_attention_from_a_model_without_it_gives_none():
    torch.manual_seed(0)
    config = ModelConfig(src_vocab_size=40, tgt_vocab_size=30, arch="seq2seq", emb_dim=16,
                         hidden_dim=16, dec_hidden_dim=24, dropout=0.0)
    model = build_model(config).eval()
    src, lengths = _batch(8, n=4)
    for beam in (1, 3):
        for hyp in search_nbest(model, src, lengths, SearchConfig(beam=beam, attention=True)):
            assert hyp[0].attention is None


@pytest.mark.parametrize("width", [19820, 704, 1000, 100])
def test_top_k_by_blocks_is_torchs_top_k(width):
    # Distinct values, so the top 10 and their order are unique; -inf entries (masked
    # pieces, dead beams) fill whole blocks, parts of blocks and the short last block.
    g = torch.Generator().manual_seed(width)
    x = torch.randperm(7 * width, generator=g).float().view(7, width)
    x[1, width // 3 :] = float("-inf")
    x[2, ::3] = float("-inf")
    x[3, width - width % 64 :] += 1e6  # the short last block holds the best entries
    values, index = top_k_by_blocks(x, 10)
    expected_values, expected_index = x.topk(10, dim=-1)
    assert torch.equal(values, expected_values)
    assert torch.equal(index, expected_index)
    # A row with fewer than 10 finite entries: its -inf picks are still distinct entries.
    x[4, 5:] = float("-inf")
    values, index = top_k_by_blocks(x, 10)
    assert torch.equal(values[4], x.topk(10, dim=-1).values[4])
    assert len(set(index[4].tolist())) == 10
    assert torch.equal(x.gather(1, index), values)


def test_beam_search_over_a_large_vocabulary_ranks_as_torchs_top_k(monkeypatch):
    # Large enough (4 beams × 500 pieces) for the blocks to matter, unlike the models above.
    torch.manual_seed(3)
    config = ModelConfig(src_vocab_size=40, tgt_vocab_size=500, emb_dim=16, hidden_dim=16,
                         dec_hidden_dim=24, attn_dim=12, output_dim=20, dropout=0.0)
    model = build_model(config).eval()
    src, lengths = _batch(5)
    search = SearchConfig(beam=4, nbest=4)
    blocks = beam_search(model, src, lengths, search)
    monkeypatch.setattr(rnmt.search, "top_k_by_blocks", lambda x, n: x.topk(n, dim=-1))
    plain = beam_search(model, src, lengths, search)
    assert [[h.tokens for h in hyps] for hyps in blocks] == [[h.tokens for h in hyps] for hyps in plain]
    assert [[h.score for h in hyps] for hyps in blocks] == [[h.score for h in hyps] for hyps in plain]


@pytest.mark.parametrize("options, needle", [
    (dict(beam=0), "--beam must be at least 1"),
    (dict(nbest=0), "--nbest must be at least 1"),
    (dict(beam=2, nbest=3), "--nbest 3 needs --beam 3 or more"),
    (dict(min_len=-1), "--min-len"),
    (dict(no_repeat_ngram=-2), "--no-repeat-ngram"),
    (dict(top_k=-1), "--top-k"),
    (dict(temperature=0.0), "--temperature must be positive"),
    (dict(top_p=0.0), "--top-p must be in (0, 1]"),
    (dict(top_p=1.5), "--top-p must be in (0, 1]"),
])
def test_search_options_that_cannot_run_are_refused(options, needle):
    with pytest.raises(ConfigError) as caught:
        SearchConfig(**options)
    assert needle in str(caught.value)


def test_sampling_may_ask_for_more_outputs_than_the_beam():
    assert SearchConfig(beam=1, nbest=4, sample=True).nbest == 4  # n independent samples
