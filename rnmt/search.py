"""Decoding: greedy, sampling and batched beam search, written once against the model protocol.

    enc = model.encode(src, src_lengths)
    state = model.init_state(enc)
    log_probs, state, attn = model.step(prev_tokens, state, enc)
    state = model.reorder_state(state, index)      # beams reordered within sentences
    enc = model.reorder_encoder(enc, index)        # rows dropped when sentences finish

Beams only ever move within their own sentence, and every beam of a sentence shares the
sentence's encoder output: the state holds m rows per sentence (its beams, consecutive),
the encoder output one, and the model's attention reads the m rows as m queries on that
one memory. So the (large) encoder output is never copied per beam, and re-indexed only
when finished sentences leave the batch, never on the per-step beam shuffle.

Scores: the raw score of y is Σ_t log p(y_t | y_<t, x), `</s>` included (minus
`unk_penalty` per `<unk>`); hypotheses are ranked by raw / lp(|y|) with the GNMT length
penalty lp(n) = ((5 + n) / 6)^α (Wu et al. 2016), |y| counting `</s>`; α = 0 ranks by the
raw score.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from rnmt.errors import ConfigError, option_flag
from rnmt.vocab import BOS, EOS, PAD, UNK

MAX_LENGTH_PENALTY = 10.0  # |α| of --length-penalty


@dataclass
class SearchConfig:
    """How to search. beam 1 = greedy. Output length is capped at `max_len_a * src_len +
    max_len_b` pieces (`</s>` included) and never more than `max_len`, whatever a and b say
    (a model that never ends a line would otherwise run for a * src_len steps: a pipeline
    stalled by one runaway line); `min_len` pieces come before `</s>` at the least.

    `nbest` hypotheses per sentence (at most `beam`; with `sample`, that many samples).
    `no_repeat_ngram` n > 0 forbids any n-gram of pieces twice in one output.
    `sample` draws each piece from p(y_t | y_<t, x)^(1/temperature), restricted to the
    `top_k` most probable pieces (0 = all) and to the smallest set of pieces holding
    `top_p` of the probability (nucleus sampling, Holtzman et al. 2020).
    `attention` keeps every hypothesis's attention weights (costs memory; off by default).
    """

    beam: int = 5
    length_penalty: float = 1.0
    max_len_a: float = 1.5
    max_len_b: int = 10
    max_len: int = 1024
    min_len: int = 0
    nbest: int = 1
    no_repeat_ngram: int = 0
    unk_penalty: float = 0.0
    sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    attention: bool = False

    def __post_init__(self) -> None:
        # nan passes every comparison below and inf makes scores nan: either one gave
        # empty output lines in silence, so a non-finite number is refused first.
        for name in ("length_penalty", "max_len_a", "unk_penalty", "temperature", "top_p"):
            if not math.isfinite(getattr(self, name)):
                raise ConfigError(f"{option_flag(name)} must be a finite number, "
                                  f"not {getattr(self, name)}")
        if abs(self.length_penalty) > MAX_LENGTH_PENALTY:
            # ((5 + |Y|) / 6)^α overflows a float (or underflows to 0) long before this
            # matters: GNMT tuned α in [0.6, 1], fairseq's and OpenNMT's defaults are 1.
            raise ConfigError(f"--length-penalty must be between -{MAX_LENGTH_PENALTY:g} and "
                              f"{MAX_LENGTH_PENALTY:g}, not {self.length_penalty:g}")
        if self.beam < 1:
            raise ConfigError("--beam must be at least 1")
        if self.nbest < 1:
            raise ConfigError("--nbest must be at least 1")
        if self.max_len < 2:
            raise ConfigError("--max-len must be at least 2 (one piece and </s>)")
        if not self.sample and self.nbest > self.beam:
            raise ConfigError(f"--nbest {self.nbest} needs --beam {self.nbest} or more")
        if self.min_len < 0 or self.no_repeat_ngram < 0 or self.top_k < 0:
            raise ConfigError("--min-len, --no-repeat-ngram and --top-k must not be negative")
        if self.temperature <= 0:
            raise ConfigError("--temperature must be positive")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError("--top-p must be in (0, 1]")


@dataclass
class Hypothesis:
    tokens: list[int]  # without </s>
    score: float  # raw log-probability, </s> included
    normalized: float  # score / lp(len + 1): what hypotheses are ranked by
    attention: Tensor | None = None  # (len(tokens) + 1, src_len), only when asked for


def length_penalty(length: int, alpha: float) -> float:
    return ((5.0 + length) / 6.0) ** alpha


def _max_lengths(src_lengths: Tensor, config: SearchConfig) -> Tensor:
    """Per sentence, the most target pieces (</s> included): at least 2, so that one piece
    always fits before </s> (a limit of 1 allows only </s>: an empty line whatever the
    input), at most `config.max_len`; clamped as floats, as a huge `max_len_a` overflows an
    int64 into a negative."""
    limit = config.max_len_a * src_lengths.double() + config.max_len_b
    return limit.clamp(min=2, max=config.max_len).long()


def _ban_repeated_ngrams(log_probs: Tensor, tokens: Tensor, n: int) -> None:
    """Forbid every piece that would complete an n-gram already in its row's output.

    tokens (rows, t): the output so far. The n-gram windows (rows, t - n + 1, n) whose first
    n - 1 pieces equal the row's last n - 1 pieces name the banned next pieces; all rows
    at once, no loop over rows.
    """
    if tokens.size(1) < n or n < 1:
        return
    if n == 1:
        banned = torch.zeros_like(log_probs).scatter_(1, tokens, 1.0)
    else:
        windows = tokens.unfold(1, n, 1)  # (rows, windows, n)
        last = tokens[:, -(n - 1):].unsqueeze(1)  # (rows, 1, n - 1)
        match = (windows[:, :, :-1] == last).all(dim=-1).to(log_probs.dtype)
        banned = torch.zeros_like(log_probs).scatter_add_(1, windows[:, :, -1], match)
    log_probs.masked_fill_(banned > 0, float("-inf"))


def _mask_log_probs(log_probs: Tensor, t: int, max_lens: Tensor, config: SearchConfig,
                    tokens: Tensor | None = None) -> Tensor:
    """No <pad>/<s> ever; <unk> penalised; no </s> before `min_len`; no repeated n-gram;
    only </s> at the length limit."""
    log_probs[:, PAD] = float("-inf")
    log_probs[:, BOS] = float("-inf")
    if config.unk_penalty:
        log_probs[:, UNK] -= config.unk_penalty
    if t < config.min_len:
        log_probs[:, EOS] = float("-inf")
    if config.no_repeat_ngram and tokens is not None:
        _ban_repeated_ngrams(log_probs, tokens, config.no_repeat_ngram)
    at_limit = t + 1 >= max_lens
    if bool(at_limit.any()):
        eos_scores = log_probs[at_limit, EOS].clone()
        log_probs[at_limit] = float("-inf")
        log_probs[at_limit, EOS] = eos_scores.clamp(min=-1e9)  # finishing must stay possible
    return log_probs


# Width of the blocks `top_k_by_blocks` ranks first; measured on the reference model's
# (64 sentences, 5 × 3964 candidates): 64 and 128 are fastest, 32 and 256 take ~40% longer.
TOPK_BLOCK = 64


def top_k_by_blocks(x: Tensor, n: int, block: int = TOPK_BLOCK) -> tuple[Tensor, Tensor]:
    """`x.topk(n, dim=-1)` for wide rows: the same values, sorted, and their indices.

    x (rows, width) -> values, indices (rows, n). Each row is cut into blocks of `block`
    entries (the last `width % block` entries stay one short block); the n best entries
    lie in the n blocks with the largest maxima (a block holding one of them, but not
    among those n, would leave n blocks each holding an entry larger than it), so one
    maximum per block, a top-n over the maxima and a top-n over those n · block entries
    (and the short block) replace the top-n over all of them. On the reference model's
    beam-5 candidates, (64, 19820), n = 10: 0.45 ms against torch's 0.83 ms on the CPU,
    whose top-k costs several times a block maximum per entry (a GPU's top-k is one fast
    kernel: there it is used as is). With ties at the n-th value, which of the tied
    entries come back may differ from `x.topk` (torch leaves it open too).
    """
    x = x.contiguous()
    rows, width = x.shape
    blocks = width // block
    if blocks <= n or x.device.type != "cpu":
        return x.topk(n, dim=-1)
    full = blocks * block
    maxima = x[:, :full].view(rows, blocks, block).amax(dim=-1)  # (rows, blocks)
    first = maxima.topk(n, dim=-1).indices  # (rows, n)
    offsets = torch.arange(block, device=x.device)
    index = (first.unsqueeze(-1) * block + offsets).view(rows, n * block)
    if full < width:
        tail = torch.arange(full, width, device=x.device).expand(rows, -1)
        index = torch.cat([index, tail], dim=1)
    values, pick = x.gather(1, index).topk(n, dim=-1)
    return values, index.gather(1, pick)


# ---------------------------------------------------------------------------------------
# One path per sentence: greedy search and sampling
# ---------------------------------------------------------------------------------------


def _argmax(log_probs: Tensor) -> Tensor:
    return log_probs.argmax(dim=-1)


def sampler(config: SearchConfig, generator: torch.Generator | None) -> Callable[[Tensor], Tensor]:
    """Draw y_t ~ softmax(log p / T) restricted to the top-k pieces and the top-p nucleus."""

    def pick(log_probs: Tensor) -> Tensor:
        logits = log_probs / config.temperature
        if config.top_k and config.top_k < logits.size(-1):
            kth = logits.topk(config.top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if config.top_p < 1.0:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            probs = sorted_logits.softmax(dim=-1)
            # Drop a piece when the pieces before it already hold top_p: the first stays.
            outside = probs.cumsum(dim=-1) - probs >= config.top_p
            logits = logits.scatter(1, order, sorted_logits.masked_fill(outside, float("-inf")))
        probs = logits.softmax(dim=-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)

    return pick


@torch.no_grad()
def _single_path(model, src: Tensor, src_lengths: Tensor, config: SearchConfig,
                 pick: Callable[[Tensor], Tensor], prefix: Tensor | None = None,
                 prefix_lengths: Tensor | None = None) -> list[Hypothesis]:
    """One output per row; finished rows leave the batch.

    With a `prefix` (rows, P) of pieces and its lengths (rows,), row i is fed its first
    `prefix_lengths[i]` pieces before choosing any (a language model continuing a text);
    hypotheses then hold and score only the continuation, whose length is capped as usual.
    """
    n = src.size(0)
    device = src.device
    enc = model.encode(src, src_lengths)
    state = model.init_state(enc)
    max_lens = _max_lengths(src_lengths, config).to(device)
    if prefix is not None:
        assert prefix_lengths is not None
        prefix, prefix_lengths = prefix.to(device), prefix_lengths.to(device)
        max_lens = max_lens + prefix_lengths
    prev = torch.full((n,), BOS, dtype=torch.long, device=device)
    active = torch.arange(n, device=device)  # sentence of each row
    tokens = torch.zeros((n, 0), dtype=torch.long, device=device)
    keep_tokens = config.no_repeat_ngram > 0
    # Per step: (rows' sentences, pieces, scores, chosen (not forced) mask, attention)
    history: list[tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]] = []
    for t in range(int(max_lens.max())):
        log_probs, state, attn = model.step(prev, state, enc)
        log_probs = _mask_log_probs(log_probs, t, max_lens, config, tokens)
        choice = pick(log_probs)
        chosen: Tensor | None = None
        if prefix is not None and t < prefix.size(1):
            assert prefix_lengths is not None
            forced = t < prefix_lengths[active]
            choice = torch.where(forced, prefix[active, t], choice)
            chosen = ~forced
        score = log_probs.gather(1, choice.unsqueeze(1)).squeeze(1)
        del log_probs  # before the next step allocates its own (see beam_search)
        history.append((active, choice, score, chosen, attn if config.attention else None))
        if keep_tokens:
            tokens = torch.cat([tokens, choice.unsqueeze(1)], dim=1)
        alive = choice != EOS
        prev = choice
        if not bool(alive.all()):
            if not bool(alive.any()):
                break
            keep = alive.nonzero().squeeze(1)
            state = model.reorder_state(state, keep)
            enc = model.reorder_encoder(enc, keep)
            prev, active, max_lens, tokens = prev[keep], active[keep], max_lens[keep], tokens[keep]
    # Gather each sentence's pieces once, on the host, after the loop.
    out_tokens: list[list[int]] = [[] for _ in range(n)]
    scores = [0.0] * n
    attns: list[list[Tensor]] = [[] for _ in range(n)]
    src_len = src_lengths.tolist()
    for rows, toks, step_scores, chosen, attn in history:
        flags = [True] * len(toks) if chosen is None else chosen.tolist()
        for r, (sent, tok, s, own) in enumerate(zip(rows.tolist(), toks.tolist(),
                                                    step_scores.tolist(), flags)):
            if not own:
                continue
            scores[sent] += s
            if tok != EOS:
                out_tokens[sent].append(tok)
            if attn is not None:
                attns[sent].append(attn[r, : src_len[sent]])
    return [
        Hypothesis(toks, s, s / length_penalty(len(toks) + 1, config.length_penalty),
                   torch.stack(a) if a else None)
        for toks, s, a in zip(out_tokens, scores, attns)
    ]


def greedy_search(model, src: Tensor, src_lengths: Tensor, config: SearchConfig,
                  prefix: Tensor | None = None, prefix_lengths: Tensor | None = None
                  ) -> list[Hypothesis]:
    """Pick the most probable piece at every step; finished sentences leave the batch."""
    return _single_path(model, src, src_lengths, config, _argmax, prefix, prefix_lengths)


def sample_search(model, src: Tensor, src_lengths: Tensor, config: SearchConfig,
                  prefix: Tensor | None = None, prefix_lengths: Tensor | None = None
                  ) -> list[Hypothesis]:
    """Draw one output per row (see `sampler`); `config.seed` makes the draws repeatable."""
    generator = None
    if config.seed is not None:
        generator = torch.Generator(device=src.device).manual_seed(config.seed)
    return _single_path(model, src, src_lengths, config, sampler(config, generator), prefix,
                        prefix_lengths)


# ---------------------------------------------------------------------------------------
# Beam search
# ---------------------------------------------------------------------------------------


@torch.no_grad()
def beam_search(model, src: Tensor, src_lengths: Tensor, config: SearchConfig
                ) -> list[list[Hypothesis]]:
    """Batched beam search: all beams of all sentences in one tensor of `n * beam` rows.

    At each step the 2·beam best extensions of every sentence are ranked; a `</s>` among
    the first `beam` of them finishes a hypothesis, and the best `beam` others go on (as in
    fairseq, so that beam 1 is exactly greedy search). A sentence is done, and leaves the
    batch, once it has `beam` finished hypotheses and its best live beam, scored as if it
    ended now (raw / lp(its length)), cannot beat the worst of the `beam` best finished
    ones, or at the length limit. For α ≤ 0 that bound is exact (log-probs only fall and
    lp does not grow); for α > 0 it is the usual heuristic (a live beam could still gain
    from lp growing). Returns, per sentence, its `beam` best finished hypotheses, best first.
    """
    k = config.beam
    n = src.size(0)
    device = src.device
    alpha = config.length_penalty
    enc = model.encode(src, src_lengths)
    state = model.init_state(enc)
    # The encoder output stays one row per sentence (its k beams share it, see the module
    # docstring); the state has one row per sentence until step 0 has run, since the k
    # beams start equal.
    expand = torch.arange(n, device=device).repeat_interleave(k)
    # Per row (beam) rather than per sentence: the mask below is applied row by row.
    max_lens = _max_lengths(src_lengths, config).to(device).repeat_interleave(k)
    src_len = src_lengths.tolist()

    active = torch.arange(n, device=device)  # sentence of each group of k rows
    active_list = list(range(n))
    scores = torch.full((n, k), float("-inf"), device=device)
    scores[:, 0] = 0.0  # all beams start equal: expand only the first at step 0
    tokens = torch.zeros((n * k, 0), dtype=torch.long, device=device)
    attns: Tensor | None = None  # (rows, t, src_len), only when asked for
    prev = torch.full((n,), BOS, dtype=torch.long, device=device)  # k rows each after step 0
    finished: list[list[Hypothesis]] = [[] for _ in range(n)]
    # Per sentence: how many hypotheses have finished, and the k-th best normalized score
    # among them; tensors, so the stopping test below needs no Python loop over sentences.
    n_finished = torch.zeros(n, dtype=torch.long, device=device)
    worst = torch.full((n,), float("-inf"), device=device)

    for t in range(int(max_lens.max())):
        groups = active.numel()
        log_probs, state, attn = model.step(prev, state, enc)
        if t == 0:
            log_probs, state = log_probs[expand], model.reorder_state(state, expand)
            attn = None if attn is None else attn[expand]
        log_probs = _mask_log_probs(log_probs, t, max_lens, config, tokens)
        vocab = log_probs.size(-1)
        # In place: log_probs, the largest tensor of the step, is not read again.
        candidates = log_probs.view(groups, k, vocab).add_(scores.unsqueeze(-1)).view(groups, -1)
        top_scores, top_index = top_k_by_blocks(candidates, 2 * k)  # (groups, 2k)
        # The step's (rows, vocab) tensor, the largest, goes before the next step asks for
        # one of the same size: the allocator then hands back this block, still in the
        # CPU's caches, instead of a cold one. Beam 5 over Multi30k test_2016, reference
        # model, one process, runs alternating: fp32 1.023x, bf16 1.051x.
        del log_probs, candidates
        top_beam = torch.div(top_index, vocab, rounding_mode="floor")
        top_token = top_index % vocab
        is_eos = (top_token == EOS) & torch.isfinite(top_scores)
        if config.attention and attn is not None:  # a model without attention has none to give
            step_attn = attn.unsqueeze(1)
            attns = step_attn if attns is None else torch.cat([attns, step_attn], dim=1)

        # Finish the hypotheses that end among each sentence's k best extensions.
        eos_first_k = is_eos[:, :k]
        if bool(eos_first_k.any()):
            penalty = length_penalty(t + 1, alpha)
            where = eos_first_k.nonzero()
            g_idx, j_idx = where[:, 0], where[:, 1]
            rows = g_idx * k + top_beam[g_idx, j_idx]
            raws = top_scores[g_idx, j_idx].tolist()
            ends = tokens[rows].tolist()
            ends_attn = attns[rows] if attns is not None else None
            touched: dict[int, float] = {}
            for e, (g, raw) in enumerate(zip(g_idx.tolist(), raws)):
                sent = active_list[g]
                a = None if ends_attn is None else ends_attn[e, :, : src_len[sent]]
                finished[sent].append(Hypothesis(ends[e], raw, raw / penalty, a))
                ranked = sorted((h.normalized for h in finished[sent]), reverse=True)
                touched[sent] = ranked[k - 1] if len(ranked) >= k else float("-inf")
            sents = torch.tensor(list(touched), device=device)
            n_finished[sents] = torch.tensor([len(finished[i]) for i in touched], device=device)
            worst[sents] = torch.tensor(list(touched.values()), device=device)

        # The k best extensions that do not end go on.
        go_on = top_scores.masked_fill(is_eos, float("-inf"))
        scores, pick = go_on.topk(k, dim=-1)
        beams = top_beam.gather(1, pick)
        prev = top_token.gather(1, pick).view(-1)
        rows = (torch.arange(groups, device=device).unsqueeze(1) * k + beams).view(-1)
        tokens = torch.cat([tokens[rows], prev.unsqueeze(1)], dim=1)
        if attns is not None:
            attns = attns[rows]
        state = model.reorder_state(state, rows)

        # Done: k finished, and the best live beam, scored as if it ended now, cannot
        # beat the worst of them (exact for α <= 0: extending never raises a raw score).
        best_live = scores[:, 0] / length_penalty(t + 1, alpha)
        done = (n_finished[active] >= k) & (best_live <= worst[active])
        n_done = int(done.sum())
        if n_done == groups:
            break
        if n_done:
            keep_groups = (~done).nonzero().squeeze(1)
            keep_rows = (keep_groups.unsqueeze(1) * k + torch.arange(k, device=device)).view(-1)
            state = model.reorder_state(state, keep_rows)
            enc = model.reorder_encoder(enc, keep_groups)
            tokens, prev = tokens[keep_rows], prev[keep_rows]
            if attns is not None:
                attns = attns[keep_rows]
            scores, active, max_lens = scores[keep_groups], active[keep_groups], max_lens[keep_rows]
            active_list = active.tolist()

    for hyps in finished:
        hyps.sort(key=lambda h: h.normalized, reverse=True)
        del hyps[k:]
    return finished


# ---------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------


def search_nbest(model, src: Tensor, src_lengths: Tensor, config: SearchConfig,
                 prefix: Tensor | None = None, prefix_lengths: Tensor | None = None
                 ) -> list[list[Hypothesis]]:
    """Up to `config.nbest` hypotheses per sentence, best first: beam search, greedy for
    beam 1, or `nbest` independent samples with `config.sample`."""
    if config.sample:
        k = config.nbest
        rep = torch.arange(src.size(0)).repeat_interleave(k)
        hyps = sample_search(
            model, src[rep.to(src.device)], src_lengths[rep], config,
            None if prefix is None else prefix[rep.to(prefix.device)],
            None if prefix_lengths is None else prefix_lengths[rep],
        )
        groups = [hyps[i * k : (i + 1) * k] for i in range(src.size(0))]
        return [sorted(g, key=lambda h: h.normalized, reverse=True) for g in groups]
    if config.beam <= 1:
        return [[h] for h in greedy_search(model, src, src_lengths, config, prefix,
                                           prefix_lengths)]
    if prefix is not None:
        raise ConfigError("continuing a text works with --sample or --beam 1, not beam search")
    return [hyps[: config.nbest] for hyps in beam_search(model, src, src_lengths, config)]


def search(model, src: Tensor, src_lengths: Tensor, config: SearchConfig) -> list[Hypothesis]:
    """The best hypothesis per sentence."""
    return [hyps[0] for hyps in search_nbest(model, src, src_lengths, config)]
