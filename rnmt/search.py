"""Decoding: greedy and batched beam search, written once against the model protocol.

    enc = model.encode(src, src_lengths)
    state = model.init_state(enc)
    log_probs, state, attn = model.step(prev_tokens, state, enc)
    state = model.reorder_state(state, index)      # beams reordered within sentences
    enc = model.reorder_encoder(enc, index)        # rows dropped when sentences finish

Beams only ever move within their own sentence, and every beam of a sentence shares the
sentence's encoder output, so the (large) encoder output is re-indexed only when finished
sentences leave the batch, never on the per-step beam shuffle.

Scores: the raw score of y is Σ_t log p(y_t | y_<t, x), `</s>` included; hypotheses are
ranked by raw / lp(|y|) with the GNMT length penalty lp(n) = ((5 + n) / 6)^α
(Wu et al. 2016), |y| counting `</s>`; α = 0 ranks by the raw score.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from rnmt.vocab import BOS, EOS, PAD


@dataclass
class SearchConfig:
    """beam 1 = greedy. Output length is capped at `max_len_a * src_len + max_len_b`."""

    beam: int = 5
    length_penalty: float = 1.0
    max_len_a: float = 1.5
    max_len_b: int = 10
    min_len: int = 0


@dataclass
class Hypothesis:
    tokens: list[int]  # without </s>
    score: float  # raw log-probability, </s> included
    normalized: float  # score / lp(len + 1): what hypotheses are ranked by


def length_penalty(length: int, alpha: float) -> float:
    return ((5.0 + length) / 6.0) ** alpha


def _max_lengths(src_lengths: Tensor, config: SearchConfig) -> Tensor:
    """Per sentence, the most target pieces (</s> included), at least 1."""
    limit = (config.max_len_a * src_lengths.float() + config.max_len_b).long()
    return limit.clamp(min=1)


def _mask_log_probs(log_probs: Tensor, t: int, max_lens: Tensor, config: SearchConfig) -> Tensor:
    """No <pad>/<s> ever; no </s> before `min_len`; only </s> at the length limit."""
    log_probs[:, PAD] = float("-inf")
    log_probs[:, BOS] = float("-inf")
    if t < config.min_len:
        log_probs[:, EOS] = float("-inf")
    at_limit = t + 1 >= max_lens
    if bool(at_limit.any()):
        eos_scores = log_probs[at_limit, EOS].clone()
        log_probs[at_limit] = float("-inf")
        log_probs[at_limit, EOS] = eos_scores.clamp(min=-1e9)  # finishing must stay possible
    return log_probs


@torch.no_grad()
def greedy_search(model, src: Tensor, src_lengths: Tensor, config: SearchConfig
                  ) -> list[Hypothesis]:
    """Pick the most probable piece at every step; finished sentences leave the batch."""
    n = src.size(0)
    enc = model.encode(src, src_lengths)
    state = model.init_state(enc)
    max_lens = _max_lengths(src_lengths, config).to(src.device)
    prev = torch.full((n,), BOS, dtype=torch.long, device=src.device)
    active = torch.arange(n, device=src.device)  # sentence of each row
    history: list[tuple[Tensor, Tensor, Tensor]] = []  # (rows' sentences, tokens, scores)
    for t in range(int(max_lens.max())):
        log_probs, state, _ = model.step(prev, state, enc)
        log_probs = _mask_log_probs(log_probs, t, max_lens, config)
        score, prev = log_probs.max(dim=-1)
        history.append((active, prev, score))
        alive = prev != EOS
        if not bool(alive.all()):
            if not bool(alive.any()):
                break
            keep = alive.nonzero().squeeze(1)
            state = model.reorder_state(state, keep)
            enc = model.reorder_encoder(enc, keep)
            prev, active, max_lens = prev[keep], active[keep], max_lens[keep]
    # Gather each sentence's pieces once, on the host, after the loop.
    tokens: list[list[int]] = [[] for _ in range(n)]
    scores = [0.0] * n
    for rows, toks, step_scores in history:
        for sent, tok, s in zip(rows.tolist(), toks.tolist(), step_scores.tolist()):
            scores[sent] += s
            if tok != EOS:
                tokens[sent].append(tok)
    return [
        Hypothesis(toks, s, s / length_penalty(len(toks) + 1, config.length_penalty))
        for toks, s in zip(tokens, scores)
    ]


@torch.no_grad()
def beam_search(model, src: Tensor, src_lengths: Tensor, config: SearchConfig
                ) -> list[list[Hypothesis]]:
    """Batched beam search: all beams of all sentences in one tensor of `n * beam` rows.

    At each step the 2·beam best extensions of every sentence are ranked; a `</s>` among
    the first `beam` of them finishes a hypothesis, and the best `beam` others go on (as in
    fairseq, so that beam 1 is exactly greedy search). A sentence is done once it has
    `beam` finished hypotheses, and leaves the batch. Returns, per sentence, its finished
    hypotheses best first.
    """
    k = config.beam
    n = src.size(0)
    device = src.device
    enc = model.encode(src, src_lengths)
    state = model.init_state(enc)
    expand = torch.arange(n, device=device).repeat_interleave(k)
    state, enc = model.reorder_state(state, expand), model.reorder_encoder(enc, expand)
    max_lens = _max_lengths(src_lengths, config).to(device)

    active = torch.arange(n, device=device)  # sentence of each group of k rows
    scores = torch.full((n, k), float("-inf"), device=device)
    scores[:, 0] = 0.0  # all beams start equal: expand only the first at step 0
    tokens = torch.zeros((n * k, 0), dtype=torch.long, device=device)
    prev = torch.full((n * k,), BOS, dtype=torch.long, device=device)
    finished: list[list[Hypothesis]] = [[] for _ in range(n)]

    for t in range(int(max_lens.max())):
        groups = active.numel()
        log_probs, state, _ = model.step(prev, state, enc)
        row_limits = max_lens.repeat_interleave(k)
        log_probs = _mask_log_probs(log_probs, t, row_limits, config)
        vocab = log_probs.size(-1)
        candidates = (scores.unsqueeze(-1) + log_probs.view(groups, k, vocab)).view(groups, -1)
        top_scores, top_index = candidates.topk(2 * k, dim=-1)  # (groups, 2k)
        top_beam = torch.div(top_index, vocab, rounding_mode="floor")
        top_token = top_index % vocab
        is_eos = (top_token == EOS) & torch.isfinite(top_scores)

        # Finish the hypotheses that end among each sentence's k best extensions.
        eos_first_k = is_eos[:, :k]
        if bool(eos_first_k.any()):
            penalty = length_penalty(t + 1, config.length_penalty)
            for g, j in eos_first_k.nonzero().tolist():
                sent = int(active[g])
                if len(finished[sent]) < k:
                    raw = float(top_scores[g, j])
                    row = g * k + int(top_beam[g, j])
                    finished[sent].append(Hypothesis(tokens[row].tolist(), raw, raw / penalty))

        # The k best extensions that do not end go on.
        go_on = top_scores.masked_fill(is_eos, float("-inf"))
        scores, pick = go_on.topk(k, dim=-1)
        beams = top_beam.gather(1, pick)
        prev = top_token.gather(1, pick).view(-1)
        rows = (torch.arange(groups, device=device).unsqueeze(1) * k + beams).view(-1)
        tokens = torch.cat([tokens[rows], prev.unsqueeze(1)], dim=1)
        state = model.reorder_state(state, rows)

        done = torch.tensor([len(finished[int(s)]) >= k for s in active.tolist()],
                            device=device)
        if bool(done.all()):
            break
        if bool(done.any()):
            keep_groups = (~done).nonzero().squeeze(1)
            keep_rows = (keep_groups.unsqueeze(1) * k + torch.arange(k, device=device)).view(-1)
            state = model.reorder_state(state, keep_rows)
            enc = model.reorder_encoder(enc, keep_rows)
            tokens, prev = tokens[keep_rows], prev[keep_rows]
            scores, active, max_lens = scores[keep_groups], active[keep_groups], max_lens[keep_groups]

    for hyps in finished:
        hyps.sort(key=lambda h: h.normalized, reverse=True)
    return finished


def search(model, src: Tensor, src_lengths: Tensor, config: SearchConfig) -> list[Hypothesis]:
    """The best hypothesis per sentence: greedy for beam 1, beam search otherwise."""
    if config.beam <= 1:
        return greedy_search(model, src, src_lengths, config)
    return [hyps[0] for hyps in beam_search(model, src, src_lengths, config)]
