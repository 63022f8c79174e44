"""An ensemble of models sharing vocabularies, offering the same protocol as one model.

At every step the members' log-probabilities are averaged and renormalised:

    log p_ens(y_t | y_<t, x) = log_softmax_y( (1/M) Σ_m log p_m(y_t | y_<t, x) )

(a normalised geometric mean of the members' distributions, as OpenNMT-py averages
log-probabilities). Encoder outputs and decoder states are lists, one entry per member, so
search never learns it is driving more than one model.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Ensemble(nn.Module):
    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one model")
        self.members = nn.ModuleList(members)
        self.config = getattr(members[0], "config", None)

    def encode(self, src: Tensor, src_lengths: Tensor) -> list[Any]:
        return [m.encode(src, src_lengths) for m in self.members]

    def init_state(self, enc: list[Any]) -> list[Any]:
        return [m.init_state(e) for m, e in zip(self.members, enc)]

    def step(self, prev: Tensor, state: list[Any], enc: list[Any]
             ) -> tuple[Tensor, list[Any], Tensor | None]:
        """prev (batch,) -> averaged log-probs (batch, vocab), states, mean attention or None."""
        log_probs, states, attns = [], [], []
        for m, s, e in zip(self.members, state, enc):
            lp, s, a = m.step(prev, s, e)
            log_probs.append(lp)
            states.append(s)
            if a is not None:
                attns.append(a)
        mean = F.log_softmax(torch.stack(log_probs).mean(dim=0), dim=-1)
        attn = torch.stack(attns).mean(dim=0) if attns else None
        return mean, states, attn

    def reorder_state(self, state: list[Any], index: Tensor) -> list[Any]:
        return [m.reorder_state(s, index) for m, s in zip(self.members, state)]

    def reorder_encoder(self, enc: list[Any], index: Tensor) -> list[Any]:
        return [m.reorder_encoder(e, index) for m, e in zip(self.members, enc)]

    def forward(self, src: Tensor, src_lengths: Tensor, tgt_in: Tensor) -> Tensor:
        """Teacher forcing: (batch, tgt_len, vocab) scores whose log_softmax is the
        ensemble's log-probability, as `step` gives it."""
        return torch.stack(
            [F.log_softmax(m(src, src_lengths, tgt_in).float(), dim=-1) for m in self.members]
        ).mean(dim=0)
