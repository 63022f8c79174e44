"""Attention over the encoder's memory: Bahdanau's additive score and Luong's global scores.

    e_tj = score(q_t, h_j)             one number per source position j
    a_t  = softmax_j(e_tj)             padded positions masked out
    c_t  = Σ_j a_tj h_j                context vector

Scores (q: query, h: memory row):
    additive (Bahdanau et al. 2015, eq. 6; Luong's `concat`):  vᵀ tanh(W_q q + W_k h)
    dot      (Luong et al. 2015, eq. 8):                      qᵀ h
    general  (Luong et al. 2015, eq. 8):                      qᵀ W_a h

Everything that depends only on the memory (`W_k h`, `W_a h`) is computed once per sentence
by `keys()`, not once per decoder step.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

SCORES = ("bahdanau", "dot", "general", "concat")


class Attention(nn.Module):
    """Shapes: query (batch, steps, query_dim) or one step (batch * m, query_dim), m ≥ 1
    rows per memory (beams of one sentence, consecutive); memory (batch, src_len,
    memory_dim); mask (batch, src_len), True at real tokens; context (batch, steps,
    memory_dim) or (batch * m, memory_dim); weights likewise with src_len."""

    def __init__(self, score: str, query_dim: int, memory_dim: int, attn_dim: int) -> None:
        super().__init__()
        if score not in SCORES:
            raise ValueError(f"unknown attention {score!r}; choose from {SCORES}")
        self.score = score
        self.additive = score in ("bahdanau", "concat")
        if self.additive:
            self.query_proj = nn.Linear(query_dim, attn_dim, bias=False)
            self.key_proj = nn.Linear(memory_dim, attn_dim, bias=True)
            self.v = nn.Linear(attn_dim, 1, bias=False)
        elif score == "general":
            self.key_proj = nn.Linear(memory_dim, query_dim, bias=False)
        elif query_dim != memory_dim:
            raise ValueError(
                f"dot attention needs equal query and memory sizes, got {query_dim} and "
                f"{memory_dim}; use general or bahdanau"
            )

    def keys(self, memory: Tensor) -> Tensor:
        """The memory-side part of the score, computed once per sentence."""
        return memory if self.score == "dot" else self.key_proj(memory)

    def forward(
        self, query: Tensor, keys: Tensor, memory: Tensor, mask: Tensor
    ) -> tuple[Tensor, Tensor]:
        single = query.dim() == 2
        if single:
            # (batch * m, query_dim) -> (batch, m, query_dim): beam search keeps one copy of
            # each sentence's memory for its m consecutive beams, which attend as m "steps".
            batch = keys.size(0)
            if query.size(0) % batch:
                raise ValueError(f"{query.size(0)} query rows for {batch} memories")
            query = query.view(batch, query.size(0) // batch, -1)
        if self.additive:
            # (batch, steps, 1, attn) + (batch, 1, src_len, attn) -> (batch, steps, src_len).
            # tanh in place: the sum, the largest tensor of a search step, is held only once.
            hidden = (self.query_proj(query).unsqueeze(2) + keys.unsqueeze(1)).tanh_()
            scores = self.v(hidden).squeeze(-1)
        else:
            scores = torch.bmm(query, keys.transpose(1, 2))
        scores = scores.masked_fill(~mask.unsqueeze(1), float("-inf"))
        weights = torch.softmax(scores, dim=-1)
        context = torch.bmm(weights, memory)
        if single:
            return context.flatten(0, 1), weights.flatten(0, 1)
        return context, weights
