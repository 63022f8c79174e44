"""A recurrent language model over one language (Mikolov et al. 2010; Zaremba et al. 2014).

    s_t = RNN(E y_{t-1}, s_{t-1}),   s_0 = 0
    p(y_t | y_<t) = softmax(W_out s_t)

It is the vanilla decoder with nothing to condition on, and it offers the same protocol as
`Seq2Seq`, so search, sampling and forced-decoding scorers work on it unchanged:

    enc = model.encode(src, src_lengths)      # an empty EncoderOut: memory (batch, 0, 0);
                                              # only src.size(0), the batch size, is read
    state = model.init_state(enc)             # zeros
    log_probs, state, None = model.step(prev, state, enc)
    logits = model(src, src_lengths, tgt_in)  # src ignored; tgt_in = <s> y_1 … y_n
    loss, nll = model(src, src_lengths, tgt_in, real, targets)  # training (rnmt.nn.loss)

Training path: the whole sequence runs through the RNN in one fused call (nothing from
step t-1 but the state is needed at step t).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rnmt.models.config import ModelConfig
from rnmt.models.decoder import DecoderState
from rnmt.models.encoder import EncoderOut
from rnmt.models.seq2seq import output_layer, step_log_probs
from rnmt.nn.dropout import Dropout
from rnmt.nn.loss import vocabulary_loss
from rnmt.nn.rnn import RNN
from rnmt.nn.scratch import ScratchBuffer
from rnmt.vocab import PAD


class LanguageModel(nn.Module):
    """Embedding -> (stacked) RNN -> output projection. Shapes: tgt_in (batch, len) ids ->
    logits (batch, len, vocab)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = c = config
        self.embed = nn.Embedding(c.tgt_vocab_size, c.emb_dim, padding_idx=PAD)
        self.dropout = Dropout(c.dropout)
        self.rnn = RNN(c.cell, c.emb_dim, c.dec_hidden_dim, c.dec_layers, False, c.dropout,
                       c.cell_impl)
        self.projection, self.generator = output_layer(c.dec_hidden_dim, self.embed,
                                                       c.tie_embeddings)
        self.logit_buffer = ScratchBuffer()  # reused by the CPU training loss, not a weight

    # --- the protocol -------------------------------------------------------------------

    def encode(self, src: Tensor, src_lengths: Tensor) -> EncoderOut:
        """Nothing to encode: an empty memory that only carries the batch size."""
        batch = src.size(0)
        memory = self.embed.weight.new_zeros(batch, 0, 0)
        mask = torch.zeros(batch, 0, dtype=torch.bool, device=memory.device)
        return EncoderOut(memory, mask)

    def init_state(self, enc: EncoderOut) -> DecoderState:
        """s_0 = 0 for every layer (and c_0 = 0 for an LSTM)."""
        zeros = enc.memory.new_zeros(self.rnn.num_layers, enc.memory.size(0),
                                     self.rnn.hidden_size)
        return DecoderState((zeros, zeros.clone()) if self.rnn.cell == "lstm" else zeros)

    def step(self, prev: Tensor, state: DecoderState, enc: EncoderOut
             ) -> tuple[Tensor, DecoderState, None]:
        """prev (batch,) -> log p(y_t | y_<t) (batch, vocab) in float32, state, no attention."""
        s, hidden = self.rnn.step(self.dropout(self.embed(prev)), state.hidden)
        logits = self.generator(self.projection(self.dropout(s)))
        return step_log_probs(logits), DecoderState(hidden), None

    def reorder_state(self, state: DecoderState, index: Tensor) -> DecoderState:
        return state.index_select(index)

    def reorder_encoder(self, enc: EncoderOut, index: Tensor) -> EncoderOut:
        return enc.index_select(index)

    def forward(self, src: Tensor, src_lengths: Tensor, tgt_in: Tensor,
                positions: Tensor | None = None, targets: Tensor | None = None,
                label_smoothing: float = 0.0) -> Tensor | tuple[Tensor, Tensor]:
        """Teacher-forced logits (batch, len, vocab) of tgt_in; `src` is not read. With
        `positions`, indices (n,) into the flattened (batch · len) positions, only those
        positions' logits (n, vocab); with `targets` (n,) too, (summed loss, summed NLL)
        instead (as `Seq2Seq.forward`).

        Padding sits after each sentence's last piece and the RNN reads left to right, so
        it never changes the logits of real positions: one fused call, no packing needed.
        """
        hidden = self.init_state(self.encode(tgt_in, src_lengths)).hidden
        s, _ = self.rnn(self.dropout(self.embed(tgt_in)), None, hidden)
        if positions is not None:
            s = s.flatten(0, 1).index_select(0, positions)
        o = self.projection(self.dropout(s))
        if targets is not None:
            return vocabulary_loss(o, self.generator, targets, label_smoothing, PAD,
                                   self.logit_buffer)
        return self.generator(o)
