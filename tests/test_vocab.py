"""Vocabularies: sentencepiece pieces mapped into rnmt's id space."""

from __future__ import annotations

import io

import sentencepiece as spm

from rnmt.vocab import BOS, EOS, PAD, SPECIALS, UNK, Vocabulary, train_sentencepiece

SENTENCES = [
    "Ein Mann mit einem orangefarbenen Hut, der etwas anstarrt.",
    "Two young, White males are outside near many bushes.",
    "Zwei junge weiße Männer sind im Freien in der Nähe vieler Büsche.",
    "A little girl climbing into a wooden playhouse.",
    "Ein kleines Mädchen klettert in ein Spielhaus aus Holz.",
    "Several men in hard hats are operating a giant pulley system.",
] * 20


def test_text_survives_encode_then_decode():
    vocab = Vocabulary.build(train_sentencepiece(SENTENCES, 200), SENTENCES)
    for sentence in SENTENCES[:6]:
        ids = vocab.encode([sentence])[0]
        assert all(i >= len(SPECIALS) for i in ids)
        assert vocab.decode(ids.tolist()) == sentence


def test_vocabulary_holds_only_pieces_seen_in_its_text():
    proto = train_sentencepiece(SENTENCES, 200)
    english = [s for s in SENTENCES if s[0] in "TAS"]
    vocab = Vocabulary.build(proto, english)
    seen = {p for ids in vocab.encode(english) for p in vocab.to_pieces(ids.tolist())}
    assert set(vocab.pieces[len(SPECIALS):]) == seen
    assert len(vocab) < spm.SentencePieceProcessor(model_proto=proto).GetPieceSize()
    # German text now has pieces outside the English vocabulary: they become <unk>.
    assert UNK in vocab.encode(["Ein kleines Mädchen klettert."])[0]


def test_special_ids_are_rnmt_ids():
    vocab = Vocabulary.build(train_sentencepiece(SENTENCES, 200), SENTENCES)
    assert vocab.pieces[PAD] == "<pad>" and vocab.pieces[UNK] == "<unk>"
    assert vocab.pieces[BOS] == "<s>" and vocab.pieces[EOS] == "</s>"
    assert vocab.decode([BOS] + vocab.encode(["A little girl"])[0].tolist() + [EOS, PAD]) == (
        "A little girl"
    )


def test_a_sentencepiece_model_with_other_special_ids_maps_into_rnmt_ids():
    # Trained elsewhere with sentencepiece's defaults: unk=0, bos=1, eos=2, no pad.
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(SENTENCES), model_writer=buffer,
                                   vocab_size=80, minloglevel=2)
    vocab = Vocabulary.build(buffer.getvalue(), SENTENCES)
    assert vocab.pieces[:4] == list(SPECIALS)
    for sentence in SENTENCES[:6]:
        assert vocab.decode(vocab.encode([sentence])[0].tolist()) == sentence


def test_vocabulary_round_trips_through_its_state_dict():
    vocab = Vocabulary.build(train_sentencepiece(SENTENCES, 200), SENTENCES)
    again = Vocabulary.from_state_dict(vocab.state_dict())
    assert again == vocab
    assert again.encode(SENTENCES[:3])[1].tolist() == vocab.encode(SENTENCES[:3])[1].tolist()
