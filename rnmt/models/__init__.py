"""Recurrent models: encoders, decoders, the encoder-decoder and the language model."""

from __future__ import annotations

from rnmt.models.config import ModelConfig
from rnmt.models.language_model import LanguageModel
from rnmt.models.seq2seq import Seq2Seq

#: Anything `build_model` returns: they all offer the model/search protocol.
Model = Seq2Seq | LanguageModel


def build_model(config: ModelConfig) -> Model:
    """The model a config describes: `LanguageModel` for arch "lm", else `Seq2Seq`."""
    if config.arch == "lm":
        return LanguageModel(config)
    return Seq2Seq(config)


__all__ = ["LanguageModel", "Model", "ModelConfig", "Seq2Seq", "build_model"]
