"""The model's configuration: everything needed to rebuild it from a checkpoint."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from typing import Any

from rnmt.errors import ConfigError, option_flag
from rnmt.nn.attention import SCORES
from rnmt.nn.rnn import CELLS, IMPLS

ARCHS = ("attention", "seq2seq", "lm")
# Deeper plain RNN stacks do not train (GNMT's 8 layers needed residual connections);
# the bound turns a mistyped `--layers` into an error rather than hours of building layers.
MAX_LAYERS = 64


@dataclass
class ModelConfig:
    """Sizes and choices of a recurrent translation model.

    `hidden_dim` is the encoder's size per direction; `dec_hidden_dim` the decoder's.
    `output_dim` is the size of the layer between the decoder state and the softmax
    (Bahdanau's deep output / Luong's attentional hidden state h̃_t).

    A language model (`arch="lm"`) is a decoder without a source: it uses `emb_dim`,
    `dec_hidden_dim`, `dec_layers`, `cell`, `cell_impl`, `dropout` and `tie_embeddings`,
    and its two vocabulary sizes are equal (one language).

    Fields added after the first release have defaults that reproduce the old models, so
    older checkpoints still load.
    """

    src_vocab_size: int
    tgt_vocab_size: int
    arch: str = "attention"
    cell: str = "lstm"
    cell_impl: str = "fused"
    emb_dim: int = 256
    hidden_dim: int = 256
    dec_hidden_dim: int = 512
    enc_layers: int = 1
    dec_layers: int = 1
    bidirectional: bool = True
    attention: str = "bahdanau"
    attn_dim: int = 512
    output_dim: int = 512
    dropout: float = 0.2
    input_feeding: bool = False  # Luong: h̃_{t-1} joins the decoder input
    reverse_source: bool = False  # Sutskever: read the source backwards (</s> stays last)
    tie_embeddings: bool = False  # decoder input embedding = output projection
    share_embeddings: bool = False  # one embedding for source and target (joined vocabulary)

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ConfigError(f"unknown --arch {self.arch!r}; choose from {', '.join(ARCHS)}")
        if self.cell not in CELLS:
            raise ConfigError(f"unknown --cell {self.cell!r}; choose from {', '.join(CELLS)}")
        if self.cell_impl not in IMPLS:
            raise ConfigError(
                f"unknown --cell-impl {self.cell_impl!r}; choose from {', '.join(IMPLS)}"
            )
        if self.attention not in SCORES:
            raise ConfigError(
                f"unknown --attention {self.attention!r}; choose from {', '.join(SCORES)}"
            )
        for name in ("emb_dim", "hidden_dim", "dec_hidden_dim", "enc_layers", "dec_layers",
                     "attn_dim", "output_dim"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{option_flag(name)} must be at least 1")
        for name in ("enc_layers", "dec_layers"):
            if getattr(self, name) > MAX_LAYERS:
                raise ConfigError(f"{option_flag(name)} must be at most {MAX_LAYERS}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError("--dropout must be in [0, 1)")
        if self.input_feeding and not (self.arch == "attention" and self.attention != "bahdanau"):
            raise ConfigError(
                "--input-feeding is Luong's: it needs --arch attention with --attention "
                "dot, general or concat (Bahdanau's decoder already feeds its context)"
            )
        if self.share_embeddings and self.arch == "lm":
            raise ConfigError("--share-embeddings needs a source side; a language model has none")
        if self.share_embeddings and self.src_vocab_size != self.tgt_vocab_size:
            raise ConfigError(
                "--share-embeddings needs one vocabulary for both sides "
                f"(got {self.src_vocab_size} and {self.tgt_vocab_size} entries)"
            )
        if self.reverse_source and self.arch == "lm":
            raise ConfigError("--reverse-source needs a source side; a language model has none")
        if self.arch == "lm" and self.src_vocab_size != self.tgt_vocab_size:
            raise ConfigError("a language model has one vocabulary: source and target sizes differ")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


def changed_options(given: dict[str, Any], saved: dict[str, Any], names: Iterable[str],
                    whose: str) -> list[str]:
    """`--name value (whose: saved value)` for each of `names` set in `given` to another value
    than in `saved`: the model options a run asks to change on weights that fix them."""
    return [f"{option_flag(name)} {given[name]} ({whose}: {saved[name]})"
            for name in names
            if name in given and name in saved and given[name] is not None
            and given[name] != saved[name]]
