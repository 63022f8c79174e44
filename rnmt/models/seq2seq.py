"""The encoder-decoder: the model side of the protocol that search is written against.

    enc = model.encode(src, src_lengths)                  # EncoderOut
    state = model.init_state(enc)                         # DecoderState
    log_probs, state, attn = model.step(prev, state, enc) # one target position
    state = model.reorder_state(state, index)             # keep/repeat rows (beams)
    enc = model.reorder_encoder(enc, index)               # keep/repeat sentences
    logits = model(src, src_lengths, tgt_in)              # teacher forcing
    loss, nll = model(src, src_lengths, tgt_in, real, targets)  # training (rnmt.nn.loss)

Options that change the wiring, not the equations: `reverse_source` (Sutskever et al. 2014
read the source backwards, so the first source words sit next to the first target words),
`share_embeddings` (one embedding matrix for both sides, needs a joined vocabulary) and
`tie_embeddings` (the target embedding is also the output projection, Press & Wolf 2017).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rnmt.models.config import ModelConfig
from rnmt.models.decoder import AttentionDecoder, DecoderState, PlainDecoder
from rnmt.models.encoder import Encoder, EncoderOut
from rnmt.nn.linear import Linear
from rnmt.nn.loss import vocabulary_loss
from rnmt.nn.scratch import ScratchBuffer
from rnmt.vocab import PAD


class Bridge(nn.Module):
    """The encoder's final state starts the decoder (Sutskever et al. 2014), through a
    learned map so the sizes may differ: s_0^(l) = tanh(W_l [h→_n; h←_1; c…] + b_l).

    Decoder layer l starts from encoder layer min(l, encoder layers - 1).
    """

    def __init__(self, final_dim: int, cell: str, hidden_dim: int, layers: int) -> None:
        super().__init__()
        self.parts = 2 if cell == "lstm" else 1
        self.hidden_dim = hidden_dim
        self.maps = nn.ModuleList(
            Linear(final_dim, hidden_dim * self.parts) for _ in range(layers)
        )

    def forward(self, final: list[Tensor]):
        per_layer = [
            torch.tanh(m(final[min(i, len(final) - 1)])) for i, m in enumerate(self.maps)
        ]
        stacked = torch.stack(per_layer)  # (layers, batch, parts * hidden)
        if self.parts == 2:
            h, c = stacked.split(self.hidden_dim, dim=-1)
            return (h.contiguous(), c.contiguous())
        return stacked


def step_log_probs(logits: Tensor) -> Tensor:
    """log_softmax of one step's logits (batch, vocab), in float32 even when the model runs
    in half precision: search adds these scores up over many steps.

    Not as z - logsumexp(z): torch's logsumexp allocates a (batch, vocab) temporary all
    the same, and its five passes took twice the time of the fused log_softmax in a beam-5
    profile. On a CPU without autograd the log-softmax overwrites the logits, which
    nothing reads again (the CPU kernel finishes a row's max and sum before it writes the
    row): beam 5 over Multi30k test_2016 with the reference model ran 1.022x as fast in
    fp32 and 1.022-1.047x with `--precision bf16` as with a fresh (batch, vocab) result
    every step (one process, runs alternating), the output the same. Elsewhere (a GPU,
    whose cached allocator gains nothing from it, unmeasured) a fresh result as before."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    if logits.requires_grad or logits.device.type != "cpu":
        return F.log_softmax(logits, dim=-1)
    return torch.log_softmax(logits, -1, out=logits)


def reverse_source(src: Tensor, src_lengths: Tensor) -> Tensor:
    """x_1 … x_n </s> -> x_n … x_1 </s> per sentence; `</s>` and the padding stay in place.

    Shapes: src (batch, src_len) ids whose row b ends with `</s>` at src_lengths[b] - 1.
    """
    real = (src_lengths.to(src.device) - 1).unsqueeze(1)  # (batch, 1): pieces before </s>
    steps = torch.arange(src.size(1), device=src.device).unsqueeze(0)  # (1, src_len)
    return src.gather(1, torch.where(steps < real, real - 1 - steps, steps))


def output_layer(input_dim: int, embed: nn.Embedding, tie: bool) -> tuple[nn.Module, nn.Linear]:
    """The map from the decoder's output o_t to the logits: (projection, generator).

    Untied: logits = W_out o_t + b.  Tied (Press & Wolf 2017): W_out = E, the target
    embedding matrix, so logits = E (P o_t) + b, where P maps o_t to the embedding size
    (identity when the sizes already agree).
    """
    vocab, emb_dim = embed.num_embeddings, embed.embedding_dim
    if not tie:
        return nn.Identity(), nn.Linear(input_dim, vocab)
    projection: nn.Module = (
        nn.Identity() if input_dim == emb_dim else Linear(input_dim, emb_dim, bias=False)
    )
    generator = nn.Linear(emb_dim, vocab)
    generator.weight = embed.weight
    return projection, generator


class Seq2Seq(nn.Module):
    """Encoder, bridge, decoder and the output projection W_out (output_dim -> vocab)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        tgt_embed = nn.Embedding(c.tgt_vocab_size, c.emb_dim, padding_idx=PAD)
        src_embed = (
            tgt_embed if c.share_embeddings
            else nn.Embedding(c.src_vocab_size, c.emb_dim, padding_idx=PAD)
        )
        self.encoder = Encoder(src_embed, c.cell, c.hidden_dim, c.enc_layers, c.bidirectional,
                               c.dropout, c.cell_impl)
        if c.arch == "attention":
            self.decoder: AttentionDecoder | PlainDecoder = AttentionDecoder(
                tgt_embed, c.cell, c.dec_hidden_dim, c.dec_layers, self.encoder.memory_dim,
                c.attention, c.attn_dim, c.output_dim, c.input_feeding, c.dropout, c.cell_impl,
            )
        else:
            self.decoder = PlainDecoder(tgt_embed, c.cell, c.dec_hidden_dim, c.dec_layers,
                                        c.dropout, c.cell_impl)
        self.bridge = Bridge(self.encoder.final_dim, c.cell, c.dec_hidden_dim, c.dec_layers)
        self.projection, self.generator = output_layer(self.decoder.output_dim, tgt_embed,
                                                       c.tie_embeddings)
        self.logit_buffer = ScratchBuffer()  # reused by the CPU training loss, not a weight

    # --- the protocol -------------------------------------------------------------------

    def encode(self, src: Tensor, src_lengths: Tensor) -> EncoderOut:
        if self.config.reverse_source:
            src = reverse_source(src, src_lengths)
        enc = self.encoder(src, src_lengths)
        enc.keys = self.decoder.keys(enc.memory)
        return enc

    def init_state(self, enc: EncoderOut) -> DecoderState:
        assert enc.final is not None
        return DecoderState(self.bridge(enc.final), self._initial_feed(enc))

    def step(
        self, prev: Tensor, state: DecoderState, enc: EncoderOut
    ) -> tuple[Tensor, DecoderState, Tensor | None]:
        """prev (batch,) -> log-probabilities (batch, vocab) in float32, state, attention."""
        o, state, attn = self.decoder.step(prev, state, enc)
        logits = self.generator(self.projection(o))
        return step_log_probs(logits), state, attn

    def reorder_state(self, state: DecoderState, index: Tensor) -> DecoderState:
        return state.index_select(index)

    def reorder_encoder(self, enc: EncoderOut, index: Tensor) -> EncoderOut:
        return enc.index_select(index)

    def forward(self, src: Tensor, src_lengths: Tensor, tgt_in: Tensor,
                positions: Tensor | None = None, targets: Tensor | None = None,
                label_smoothing: float = 0.0) -> Tensor | tuple[Tensor, Tensor]:
        """Teacher-forced logits (batch, tgt_len, vocab); with `positions`, indices (n,)
        into the flattened (batch · tgt_len) positions (`Batch.real`), only those
        positions' logits (n, vocab). With `targets` too, the pieces (n,) at those
        positions, not the logits but (summed loss, summed NLL) (`rnmt.nn.loss`).

        The softmax layer is the largest matrix product of training: selecting the real
        (non-pad) positions first spares it the padding.
        """
        enc = self.encode(src, src_lengths)
        o, _ = self.decoder(tgt_in, self.init_state(enc), enc)
        if positions is not None:
            o = o.flatten(0, 1).index_select(0, positions)
        o = self.projection(o)
        if targets is not None:
            return vocabulary_loss(o, self.generator, targets, label_smoothing, PAD,
                                   self.logit_buffer)
        return self.generator(o)

    def _initial_feed(self, enc: EncoderOut) -> Tensor | None:
        decoder = self.decoder
        if isinstance(decoder, AttentionDecoder) and decoder.input_feeding:
            return enc.memory.new_zeros(enc.memory.size(0), decoder.output_dim)
        return None
