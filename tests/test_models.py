"""The encoder-decoders and the LM: padding, the step protocol, fused == reference cells,
and the wiring options (reversed source, input feeding, tied and shared embeddings)."""

from __future__ import annotations

import pytest
import torch

from rnmt.errors import ConfigError
from rnmt.models import ModelConfig, build_model
from rnmt.models.seq2seq import reverse_source, step_log_probs
from rnmt.vocab import EOS

SMALL = dict(emb_dim=16, hidden_dim=16, dec_hidden_dim=24, attn_dim=12, output_dim=20,
             dropout=0.0)


def _model(**overrides):
    torch.manual_seed(0)
    config = ModelConfig(src_vocab_size=30, tgt_vocab_size=25, **{**SMALL, **overrides})
    return build_model(config).eval().double()


def test_padding_never_changes_an_encoding():
    model = _model()
    sentences = [torch.tensor([5, 6, 7, 8, EOS]), torch.tensor([9, 10, EOS]),
                 torch.tensor([11, EOS])]
    batch = torch.zeros(3, 5, dtype=torch.long)
    for i, s in enumerate(sentences):
        batch[i, : len(s)] = s
    lengths = torch.tensor([len(s) for s in sentences])
    batched = model.encode(batch, lengths)
    for i, s in enumerate(sentences):
        alone = model.encode(s.unsqueeze(0), torch.tensor([len(s)]))
        torch.testing.assert_close(batched.memory[i, : len(s)], alone.memory[0])
        torch.testing.assert_close(batched.keys[i, : len(s)], alone.keys[0])
        for layer_b, layer_a in zip(batched.final, alone.final):
            torch.testing.assert_close(layer_b[i], layer_a[0])


def test_padding_never_changes_the_next_word_distribution():
    model = _model()
    src = torch.tensor([[5, 6, 7, EOS], [8, EOS, 0, 0]])
    lengths = torch.tensor([4, 2])
    tgt = torch.tensor([[2, 4, 5], [2, 6, 0]])
    batched = torch.log_softmax(model(src, lengths, tgt), -1)
    alone = torch.log_softmax(model(src[1:, :2], lengths[1:], tgt[1:, :2]), -1)
    torch.testing.assert_close(batched[1, :2], alone[0])


def test_step_by_step_decoding_equals_teacher_forcing():
    for attention in ("bahdanau", "general"):
        model = _model(attention=attention)
        src = torch.tensor([[5, 6, 7, EOS], [8, 9, EOS, 0]])
        lengths = torch.tensor([4, 3])
        tgt = torch.tensor([[2, 4, 5, 6], [2, 7, 8, 9]])
        forced = torch.log_softmax(model(src, lengths, tgt), -1)
        enc = model.encode(src, lengths)
        state = model.init_state(enc)
        for t in range(tgt.size(1)):
            log_probs, state, _ = model.step(tgt[:, t], state, enc)
            torch.testing.assert_close(log_probs, forced[:, t])


def test_vanilla_seq2seq_runs_the_protocol():
    model = _model(arch="seq2seq")
    src = torch.tensor([[5, 6, 7, EOS]])
    enc = model.encode(src, torch.tensor([4]))
    log_probs, state, attn = model.step(torch.tensor([2]), model.init_state(enc), enc)
    assert log_probs.shape == (1, 25) and attn is None
    assert torch.allclose(log_probs.exp().sum(-1), torch.ones(1, dtype=torch.float64))


# --- every cell, every architecture, both implementations ------------------------------
CELLS = ("rnn", "lstm", "gru")
ARCHS = {
    "seq2seq": dict(arch="seq2seq"),
    "seq2seq-reversed": dict(arch="seq2seq", reverse_source=True),
    "bahdanau": dict(arch="attention", attention="bahdanau"),
    "luong-general": dict(arch="attention", attention="general"),
    "luong-dot-feeding": dict(arch="attention", attention="dot", hidden_dim=12,
                              dec_hidden_dim=24, input_feeding=True),
    "lm": dict(arch="lm"),
}
SRC = torch.tensor([[5, 6, 7, 8, EOS], [9, 10, EOS, 0, 0], [11, EOS, 0, 0, 0]])
SRC_LENGTHS = torch.tensor([5, 3, 2])
TGT = torch.tensor([[2, 4, 5, 6], [2, 7, 8, 0], [2, 9, 0, 0]])
TGT_LENGTHS = [4, 3, 2]


def _zoo_model(arch: str, cell: str, layers: int = 2, src_vocab_size: int | None = None,
               **overrides):
    """A float64 model in eval mode; a language model (one vocabulary) gets 25 on both sides."""
    torch.manual_seed(0)
    sizes = dict(src_vocab_size=src_vocab_size or (25 if arch == "lm" else 30), tgt_vocab_size=25)
    config = ModelConfig(**sizes, cell=cell, enc_layers=layers, dec_layers=layers,
                         **{**SMALL, **ARCHS[arch], **overrides})
    return build_model(config).eval().double()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("cell", CELLS)
def test_padding_never_changes_the_logits_of_any_cell_and_architecture(arch, cell):
    model = _zoo_model(arch, cell)
    batched = model(SRC, SRC_LENGTHS, TGT)
    for i, (s, t) in enumerate(zip(SRC_LENGTHS.tolist(), TGT_LENGTHS)):
        alone = model(SRC[i : i + 1, :s], SRC_LENGTHS[i : i + 1], TGT[i : i + 1, :t])
        torch.testing.assert_close(batched[i, :t], alone[0], rtol=0, atol=1e-10)


@pytest.mark.parametrize("arch", ARCHS)
def test_selected_positions_give_the_full_forward_logits_at_those_positions(arch):
    """`positions` (a batch's host-built `real` indices) only selects: the logits at the
    real target positions, in row order, as the full teacher-forced forward gives them."""
    model = _zoo_model(arch, "lstm")
    real = (TGT.view(-1) != 0).nonzero().squeeze(1)  # what collate builds
    selected = model(SRC, SRC_LENGTHS, TGT, positions=real)
    full = model(SRC, SRC_LENGTHS, TGT)
    assert selected.shape == (sum(TGT_LENGTHS), 25)
    torch.testing.assert_close(selected, full[TGT != 0], rtol=0, atol=1e-12)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("cell", CELLS)
def test_reference_cells_give_the_fused_logits_and_steps_on_the_same_weights(arch, cell):
    fused = _zoo_model(arch, cell)
    reference = _zoo_model(arch, cell, cell_impl="reference")
    assert list(reference.state_dict()) == list(fused.state_dict())  # interchangeable checkpoints
    reference.load_state_dict(fused.state_dict())
    torch.testing.assert_close(reference(SRC, SRC_LENGTHS, TGT), fused(SRC, SRC_LENGTHS, TGT),
                               rtol=0, atol=1e-10)
    enc_f, enc_r = fused.encode(SRC, SRC_LENGTHS), reference.encode(SRC, SRC_LENGTHS)
    state_f, state_r = fused.init_state(enc_f), reference.init_state(enc_r)
    for t in range(TGT.size(1)):
        log_probs_f, state_f, _ = fused.step(TGT[:, t], state_f, enc_f)
        log_probs_r, state_r, _ = reference.step(TGT[:, t], state_r, enc_r)
        torch.testing.assert_close(log_probs_r, log_probs_f, rtol=0, atol=1e-10)


@pytest.mark.parametrize("arch", ARCHS)
def test_step_by_step_decoding_equals_teacher_forcing_in_every_architecture(arch):
    model = _zoo_model(arch, "lstm")
    forced = torch.log_softmax(model(SRC, SRC_LENGTHS, TGT), -1)
    enc = model.encode(SRC, SRC_LENGTHS)
    state = model.init_state(enc)
    for t in range(TGT.size(1)):
        log_probs, state, _ = model.step(TGT[:, t], state, enc)
        torch.testing.assert_close(log_probs, forced[:, t])


def test_reference_cells_train_the_same_weights_as_fused():
    fused = _zoo_model("bahdanau", "gru").train()
    reference = _zoo_model("bahdanau", "gru", cell_impl="reference").train()
    reference.load_state_dict(fused.state_dict())
    for model in (fused, reference):
        model(SRC, SRC_LENGTHS, TGT).logsumexp(-1).sum().backward()
    for (name, p_f), p_r in zip(fused.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p_r.grad, p_f.grad, rtol=0, atol=1e-10, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_step_log_probs_are_the_fp32_log_softmax_with_or_without_autograd(dtype):
    """Without autograd the log-softmax overwrites fp32 logits (search's hot path); with
    it, the logits stay as they are and the gradient is log_softmax's."""
    torch.manual_seed(0)
    logits = (torch.randn(6, 50) * 4).to(dtype)
    expected = torch.log_softmax(logits.float(), dim=-1)
    with torch.no_grad():
        got = step_log_probs(logits.clone())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected)
    leaf = logits.float().requires_grad_()
    with_grad = step_log_probs(leaf)
    torch.testing.assert_close(with_grad, expected)
    with_grad[:, 0].sum().backward()  # ∂ log p_0 / ∂z = onehot(0) - p
    torch.testing.assert_close(leaf.grad, torch.eye(50)[0].expand(6, 50) - expected.exp())
    assert torch.equal(leaf.detach(), logits.float())


def test_reverse_source_reverses_the_real_pieces_and_keeps_eos_last_and_padding_in_place():
    assert reverse_source(SRC, SRC_LENGTHS).tolist() == [
        [8, 7, 6, 5, EOS], [10, 9, EOS, 0, 0], [11, EOS, 0, 0, 0]]


def test_reverse_source_changes_what_the_encoder_reads():
    plain = _zoo_model("seq2seq", "lstm")
    reversed_ = _zoo_model("seq2seq-reversed", "lstm")
    reversed_.load_state_dict(plain.state_dict())
    flipped = reverse_source(SRC, SRC_LENGTHS)
    torch.testing.assert_close(reversed_(SRC, SRC_LENGTHS, TGT), plain(flipped, SRC_LENGTHS, TGT))
    assert not torch.allclose(reversed_(SRC, SRC_LENGTHS, TGT), plain(SRC, SRC_LENGTHS, TGT))


def test_input_feeding_widens_the_decoder_input_by_the_attentional_state():
    without = _zoo_model("luong-general", "lstm", layers=1)
    with_feeding = _zoo_model("luong-general", "lstm", layers=1, input_feeding=True)
    assert with_feeding.decoder.rnn.layer.input_size == (
        without.decoder.rnn.layer.input_size + SMALL["output_dim"])


@pytest.mark.parametrize("arch", ["bahdanau", "seq2seq", "lm"])
def test_tied_embeddings_are_one_matrix_with_a_projection_when_sizes_differ(arch):
    model = _zoo_model(arch, "gru", tie_embeddings=True)
    embed = model.embed if arch == "lm" else model.decoder.embed
    assert model.generator.weight is embed.weight
    assert isinstance(model.projection, torch.nn.Linear)  # output size != emb_dim here
    untied = _zoo_model(arch, "gru")
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(model) < count(untied)


def test_tied_embeddings_need_no_projection_when_sizes_agree():
    model = _zoo_model("luong-general", "lstm", tie_embeddings=True, output_dim=SMALL["emb_dim"])
    assert isinstance(model.projection, torch.nn.Identity)
    assert model.generator.weight is model.decoder.embed.weight


def test_shared_embeddings_are_one_module_for_both_sides():
    model = _zoo_model("bahdanau", "lstm", src_vocab_size=25, share_embeddings=True)
    assert model.encoder.embed is model.decoder.embed


@pytest.mark.parametrize("bad", [
    dict(share_embeddings=True),  # 30 source entries, 25 target
    dict(input_feeding=True),  # with Bahdanau attention
    dict(arch="seq2seq", input_feeding=True),
    dict(arch="lm", reverse_source=True),
    dict(arch="lm"),  # two vocabulary sizes
    dict(cell_impl="readable"),
])
def test_contradicting_model_options_are_config_errors(bad):
    with pytest.raises(ConfigError):
        ModelConfig(src_vocab_size=30, tgt_vocab_size=25, **bad)


def test_configs_of_older_checkpoints_still_load():
    old = {k: v for k, v in ModelConfig(30, 25).to_dict().items()
           if k not in ("input_feeding", "reverse_source", "tie_embeddings", "share_embeddings")}
    config = ModelConfig.from_dict(old)
    assert not (config.input_feeding or config.reverse_source or config.tie_embeddings
                or config.share_embeddings)
