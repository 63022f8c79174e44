"""Recurrent decoders: Bahdanau's attentive decoder, Luong's, and the vanilla one.

Bahdanau et al. 2015 (`attention="bahdanau"`): the score uses the *previous* state,
and the context enters both the recurrence and the output layer:

    c_t = Attention(s_{t-1}, h)                          (eq. 5-6)
    s_t = RNN([E y_{t-1}; c_t], s_{t-1})                 (eq. 4)
    o_t = tanh(W_o [s_t; c_t; E y_{t-1}])                deep output (sec. A.2.2, no maxout)
    p(y_t | y_<t, x) = softmax(W_out o_t)

Luong et al. 2015 (`attention="dot"|"general"|"concat"`): the score uses the *current* state,

    s_t = RNN([E y_{t-1}; h̃_{t-1}] if input feeding else E y_{t-1}, s_{t-1})
    c_t = Attention(s_t, h);   h̃_t = tanh(W_c [c_t; s_t])   (eq. 5)
    p(y_t | y_<t, x) = softmax(W_out h̃_t)                    (eq. 6)

Which path training (teacher forcing, `forward`) takes, per architecture:

    arch / decoder                      decoder RNN over the target       attention
    seq2seq (PlainDecoder)              one fused call                    none
    attention, Luong, no input feeding  one fused call                    all steps at once
    attention, Luong + input feeding    Python loop, one step per token   per step
    attention, Bahdanau                 Python loop, one step per token   per step
    lm (rnmt.models.language_model)     one fused call                    none

Bahdanau and Luong with input feeding need the previous step's attention output to compute
the next state, so they step through the target (the softmax still runs once over all steps
after the loop). With `cell_impl="reference"` every path is a per-token loop of the readable
cells, whatever the architecture (same results, slower). Search always uses `step`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from rnmt.models.encoder import EncoderOut
from rnmt.nn.attention import Attention, AttentionSteps
from rnmt.nn.dropout import Dropout
from rnmt.nn.linear import Linear
from rnmt.nn.rnn import RNN, State, Stepper, layer_of


@dataclass
class DecoderState:
    """hidden: the RNN state, (layers, batch, hidden) (a pair for an LSTM);
    feed: the previous attentional output h̃_{t-1} (batch, output_dim), for input feeding."""

    hidden: State
    feed: Tensor | None = None

    def index_select(self, index: Tensor) -> "DecoderState":
        if isinstance(self.hidden, tuple):
            hidden: State = tuple(h.index_select(1, index) for h in self.hidden)  # type: ignore[assignment]
        else:
            hidden = self.hidden.index_select(1, index)
        feed = None if self.feed is None else self.feed.index_select(0, index)
        return DecoderState(hidden, feed)


class AttentionDecoder(nn.Module):
    """Shapes: tgt_in (batch, tgt_len) ids; memory (batch, src_len, memory_dim);
    returns pre-softmax outputs (batch, tgt_len, output_dim) and attention weights."""

    def __init__(
        self,
        embed: nn.Embedding,
        cell: str,
        hidden_dim: int,
        layers: int,
        memory_dim: int,
        attention: str,
        attn_dim: int,
        output_dim: int,
        input_feeding: bool,
        dropout: float,
        cell_impl: str = "fused",
    ) -> None:
        super().__init__()
        self.embed = embed
        self.dropout = Dropout(dropout)
        self.bahdanau = attention == "bahdanau"
        self.input_feeding = input_feeding and not self.bahdanau
        emb_dim = embed.embedding_dim
        rnn_input = emb_dim + (memory_dim if self.bahdanau else 0)
        rnn_input += output_dim if self.input_feeding else 0
        self.rnn = RNN(cell, rnn_input, hidden_dim, layers, False, dropout, cell_impl)
        self.attention = Attention(attention, hidden_dim, memory_dim, attn_dim)
        out_input = hidden_dim + memory_dim + (emb_dim if self.bahdanau else 0)
        self.output = Linear(out_input, output_dim, bias=True)
        self.output_dim = output_dim
        # Inference only (`rnmt.step_layers.TokenProducts`, set by `swap_step_layers`):
        # E y_{t-1}'s share of the step's products by lookup; None: multiplied each step.
        self.token_products: Callable[[Tensor], list[Tensor]] | None = None

    def keys(self, memory: Tensor) -> Tensor:
        return self.attention.keys(memory)

    def step(
        self, prev: Tensor, state: DecoderState, enc: EncoderOut
    ) -> tuple[Tensor, DecoderState, Tensor]:
        """One target position: prev (batch,) ids -> o_t (batch, output_dim), state, attn.

        In a model swapped for inference with `token_products`, the RNN and the deep output
        leave out E y_{t-1}'s columns and its share of their products comes by lookup."""
        assert enc.keys is not None
        parts = None if self.token_products is None else self.token_products(prev)
        emb = self.dropout(self.embed(prev)) if parts is None else None
        if self.bahdanau:
            context, attn = self.attention(_top(state.hidden), enc.keys, enc.memory, enc.mask)
            s, hidden = self._rnn_step(emb, context, state.hidden, parts)
            if parts is None:
                o = self.output(torch.cat([s, context, emb], dim=-1))
            else:
                o = self.output(torch.cat([s, context], dim=-1)).add_(parts[1])
            o = self.dropout(torch.tanh(o))
        else:
            feed = state.feed if self.input_feeding else None
            s, hidden = self._rnn_step(emb, feed, state.hidden, parts)
            o, attn = self._luong_output(s, enc)
        return o, DecoderState(hidden, o if self.input_feeding else None), attn

    def _rnn_step(self, emb: Tensor | None, rest: Tensor | None, hidden: State,
                  parts: list[Tensor] | None) -> tuple[Tensor, State]:
        """The RNN's step on [E y_{t-1}; rest] (rest: c_t or h̃_{t-1}, None without), or,
        with looked-up `parts`, on rest alone with E y_{t-1}'s share added."""
        if parts is not None:
            return self.rnn.step(rest, hidden, parts[0])
        assert emb is not None
        return self.rnn.step(emb if rest is None else torch.cat([emb, rest], dim=-1), hidden)

    def _luong_output(self, s: Tensor, enc: EncoderOut, attend: AttentionSteps | None = None
                      ) -> tuple[Tensor, Tensor]:
        """h̃_t = tanh(W_c [c_t; s_t]) with c_t = Attention(s_t, h) (Luong eq. 5), after
        dropout, and the attention weights; s one step (batch, hidden) or all (batch,
        tgt_len, hidden). `attend`: the pass's attention, when stepping through a target."""
        assert enc.keys is not None
        if attend is not None:
            context, attn = attend(s)
        else:
            context, attn = self.attention(s, enc.keys, enc.memory, enc.mask)
        return self.dropout(torch.tanh(self.output(torch.cat([context, s], dim=-1)))), attn

    def forward(
        self, tgt_in: Tensor, state: DecoderState, enc: EncoderOut
    ) -> tuple[Tensor, Tensor]:
        """Teacher forcing over the whole target: o (batch, tgt_len, output_dim), attn."""
        assert enc.keys is not None
        if self.token_products is not None:  # swapped for inference: step by step
            outputs, attns = [], []
            for t in range(tgt_in.size(1)):
                o, state, attn = self.step(tgt_in[:, t], state, enc)
                outputs.append(o)
                attns.append(attn)
            return torch.stack(outputs, dim=1), torch.stack(attns, dim=1)
        emb = self.dropout(self.embed(tgt_in))
        if not self.bahdanau and not self.input_feeding:
            s, _ = self.rnn(emb, None, state.hidden)  # one fused call over all steps
            return self._luong_output(s, enc)
        if self.bahdanau:
            return self._bahdanau_forward(emb, state, enc)
        # Luong with input feeding: s_t = RNN([E y_{t-1}; h̃_{t-1}], s_{t-1}), as `_step`.
        stepper = Stepper(self.rnn, emb)
        attend = AttentionSteps(self.attention, enc.keys, enc.memory, enc.mask)
        outputs, attns = [], []
        hidden, feed = state.hidden, state.feed
        for t in range(emb.size(1)):
            s, hidden = stepper.step(t, feed, hidden)
            feed, attn = self._luong_output(s, enc, attend)
            outputs.append(feed)
            attns.append(attn)
        return torch.stack(outputs, dim=1), torch.stack(attns, dim=1)

    def _bahdanau_forward(
        self, emb: Tensor, state: DecoderState, enc: EncoderOut
    ) -> tuple[Tensor, Tensor]:
        """The recurrence steps token by token; the deep output o_t depends on nothing
        later steps need, so it runs once over all steps after the loop (one large matrix
        product instead of one small one per step)."""
        assert enc.keys is not None
        hidden = state.hidden
        states, contexts, attns = [], [], []
        # The embeddings' share of the RNN input product runs for all steps at once.
        stepper = Stepper(self.rnn, emb)
        attend = AttentionSteps(self.attention, enc.keys, enc.memory, enc.mask)
        for t in range(emb.size(1)):
            context, attn = attend(_top(hidden))
            s, hidden = stepper.step(t, context, hidden)
            states.append(s)
            contexts.append(context)
            attns.append(attn)
        s_all, c_all = torch.stack(states, dim=1), torch.stack(contexts, dim=1)
        o = torch.tanh(self.output(torch.cat([s_all, c_all, emb], dim=-1)))
        return self.dropout(o), torch.stack(attns, dim=1)


class PlainDecoder(nn.Module):
    """The vanilla decoder of Sutskever et al. 2014: s_t = RNN(E y_{t-1}, s_{t-1}),
    p(y_t) = softmax(W_out s_t). The whole target runs in one fused call in training."""

    def __init__(
        self, embed: nn.Embedding, cell: str, hidden_dim: int, layers: int, dropout: float,
        cell_impl: str = "fused",
    ) -> None:
        super().__init__()
        self.embed = embed
        self.dropout = Dropout(dropout)
        self.rnn = RNN(cell, embed.embedding_dim, hidden_dim, layers, False, dropout, cell_impl)
        self.output_dim = hidden_dim

    def keys(self, memory: Tensor) -> None:
        return None

    def step(
        self, prev: Tensor, state: DecoderState, enc: EncoderOut
    ) -> tuple[Tensor, DecoderState, None]:
        s, hidden = self.rnn.step(self.dropout(self.embed(prev)), state.hidden)
        return self.dropout(s), DecoderState(hidden), None

    def forward(self, tgt_in: Tensor, state: DecoderState, enc: EncoderOut) -> tuple[Tensor, None]:
        s, _ = self.rnn(self.dropout(self.embed(tgt_in)), None, state.hidden)
        return self.dropout(s), None


def _top(hidden: State) -> Tensor:
    """The top layer's hidden state h (batch, hidden) of an RNN state."""
    h = hidden[0] if isinstance(hidden, tuple) else hidden
    return layer_of(h, h.size(0) - 1)
