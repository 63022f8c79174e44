"""The encoder: source embeddings read by a (bidirectional, stacked) recurrent network."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from rnmt.nn.dropout import Dropout
from rnmt.nn.rnn import RNN, final_states


@dataclass
class EncoderOut:
    """What the decoder may look at.

    memory (batch, src_len, directions * hidden): one annotation h_j per source piece;
    keys: the attention's memory-side projection of `memory`, computed once per sentence;
    mask (batch, src_len): True at real pieces; final: per encoder layer, the final state
    of both directions (batch, final_dim), used once to start the decoder.
    """

    memory: Tensor
    mask: Tensor
    keys: Tensor | None = None
    final: list[Tensor] | None = None

    def index_select(self, index: Tensor) -> "EncoderOut":
        pick = lambda t: None if t is None else t.index_select(0, index)  # noqa: E731
        return EncoderOut(pick(self.memory), pick(self.mask), pick(self.keys), None)


class Encoder(nn.Module):
    """x_j = E s_j;  h_j = [h→_j; h←_j] = BiRNN(x)_j  (Bahdanau et al. 2015, sec. 3.2)."""

    def __init__(
        self,
        embed: nn.Embedding,
        cell: str,
        hidden_dim: int,
        layers: int,
        bidirectional: bool,
        dropout: float,
        cell_impl: str = "fused",
    ) -> None:
        super().__init__()
        self.embed = embed
        self.dropout = Dropout(dropout)
        self.rnn = RNN(cell, embed.embedding_dim, hidden_dim, layers, bidirectional, dropout,
                       cell_impl)

    @property
    def memory_dim(self) -> int:
        return self.rnn.output_size

    @property
    def final_dim(self) -> int:
        """Size of one layer's final state (h, and c for an LSTM, of every direction)."""
        return self.rnn.output_size * (2 if self.rnn.cell == "lstm" else 1)

    def forward(self, src: Tensor, src_lengths: Tensor) -> EncoderOut:
        """src (batch, src_len) ids, src_lengths (batch,) -> EncoderOut."""
        x = self.dropout(self.embed(src))
        memory, final = self.rnn(x, src_lengths)
        memory = self.dropout(memory)
        mask = torch.arange(src.size(1), device=src.device)[None, :] < src_lengths.to(
            src.device
        )[:, None]
        return EncoderOut(memory, mask, final=final_states(self.rnn, final))
