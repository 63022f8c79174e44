"""The model's configuration: everything needed to rebuild it from a checkpoint."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from rnmt.errors import ConfigError
from rnmt.nn.attention import SCORES
from rnmt.nn.rnn import CELLS

ARCHS = ("attention", "seq2seq")


@dataclass
class ModelConfig:
    """Sizes and choices of a recurrent translation model.

    `hidden_dim` is the encoder's size per direction; `dec_hidden_dim` the decoder's.
    `output_dim` is the size of the layer between the decoder state and the softmax
    (Bahdanau's deep output / Luong's attentional hidden state h̃_t).
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

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ConfigError(f"unknown --arch {self.arch!r}; choose from {', '.join(ARCHS)}")
        if self.cell not in CELLS:
            raise ConfigError(f"unknown --cell {self.cell!r}; choose from {', '.join(CELLS)}")
        if self.attention not in SCORES:
            raise ConfigError(
                f"unknown --attention {self.attention!r}; choose from {', '.join(SCORES)}"
            )
        for name in ("emb_dim", "hidden_dim", "dec_hidden_dim", "enc_layers", "dec_layers",
                     "attn_dim", "output_dim"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError("--dropout must be in [0, 1)")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})
