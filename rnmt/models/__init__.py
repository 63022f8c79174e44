"""Recurrent models: encoders, decoders and the encoder-decoder built from a config."""

from rnmt.models.config import ModelConfig
from rnmt.models.seq2seq import Seq2Seq


def build_model(config: ModelConfig) -> Seq2Seq:
    return Seq2Seq(config)


__all__ = ["ModelConfig", "Seq2Seq", "build_model"]
