"""Starting a new run from a trained model's weights: fine-tuning (fairseq's
`--finetune-from-model`, OpenNMT-py's `-train_from` with `-reset_optim all`).

Only the parameters come from the checkpoint. The optimizer, the schedule, the step count
and the position in the data start afresh, as in a new run.

The new run's vocabularies are those of its own data (the pieces of its training text), so
a piece may have another id than in the checkpoint's run, or be new. The rows of the
embeddings and of the output layer are therefore copied piece by piece, matched by their
text: a piece the checkpoint knew keeps its vectors wherever its id now is, and a new piece
keeps its fresh initialisation (OpenNMT-py's `-update_vocab`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rnmt.checkpoint import load_checkpoint
from rnmt.errors import CheckpointError, ConfigError
from rnmt.models.config import ModelConfig, changed_options
from rnmt.vocab import Vocabulary

# Model options a warm start may change: they shape no parameter.
CHANGEABLE = ("dropout",)


@dataclass
class WarmStart:
    """What a warm start took from its checkpoint: the checkpoint's update count, and per
    vocabulary side the number of pieces whose rows were copied and the vocabulary's size."""

    path: Path
    step: int
    pieces: dict[str, tuple[int, int]]


def vocabulary_side(name: str) -> str | None:
    """Which vocabulary indexes the rows of parameter `name`: "src" (the encoder's
    embedding), "tgt" (the decoder's or language model's embedding, the output layer) or
    None (a parameter of no vocabulary)."""
    if name.endswith("embed.weight"):
        return "src" if name.startswith("encoder.") else "tgt"
    if name.startswith("generator."):
        return "tgt"
    return None


def model_options(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The checkpoint at `path` (tensors memory-mapped) and its model options, by their
    `rnmt train` names (the vocabulary sizes left out: a run takes them from its data)."""
    payload = load_checkpoint(path, mmap=True)
    try:
        options = ModelConfig.from_dict(payload["model_config"]).to_dict()
    except (TypeError, ValueError, KeyError) as err:
        raise CheckpointError(f"{path}: checkpoint does not match its model ({err})") from None
    for size in ("src_vocab_size", "tgt_vocab_size"):
        options.pop(size)
    return payload, options


def check_same_model(path: str | Path, saved: dict[str, Any], options: dict[str, Any]) -> None:
    """The model options of a warm-started run must be the checkpoint's (`saved`), but
    for those in `CHANGEABLE`: its weights have the checkpoint's shapes."""
    changed = changed_options(options, saved, [name for name in saved if name not in CHANGEABLE],
                              "the checkpoint's")
    if changed:
        raise ConfigError(f"--init-from {path} starts from that model; it cannot change "
                          f"{', '.join(changed)}: drop them (only --dropout may change)")


@torch.no_grad()
def warm_start(model: nn.Module, path: str | Path, payload: dict[str, Any],
               vocabs: dict[str, Vocabulary]) -> WarmStart:
    """Copy the checkpoint `payload`'s parameters into `model`, a freshly initialised model
    of the same options over the vocabularies `vocabs` ("src", "tgt"): rows of vocabulary
    parameters piece by piece (see the module docstring), every other parameter whole."""
    saved = payload["model"]
    state = model.state_dict()
    if set(saved) != set(state):
        raise CheckpointError(f"{path}: its parameters are not those of the model it names")
    rows: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    pieces: dict[str, tuple[int, int]] = {}
    for side, vocab in vocabs.items():
        old = {piece: i for i, piece in enumerate(Vocabulary.from_state_dict(
            payload[f"{side}_vocab"]).pieces)}
        pairs = [(i, old[piece]) for i, piece in enumerate(vocab.pieces) if piece in old]
        new_ids, old_ids = zip(*pairs)  # the 4 specials are always in both
        rows[side] = torch.tensor(new_ids), torch.tensor(old_ids)
        pieces[side] = (len(pairs), len(vocab))
    for name, tensor in state.items():
        side = vocabulary_side(name)
        source = saved[name]
        if side is not None:
            new_ids, old_ids = rows[side]
            if source.shape[1:] != tensor.shape[1:] or int(old_ids.max()) >= source.size(0):
                raise CheckpointError(f"{path}: {name} has the shape {tuple(source.shape)}, "
                                      "which its vocabulary and model do not give")
            tensor[new_ids.to(tensor.device)] = source[old_ids].to(tensor)
        elif source.shape != tensor.shape:
            raise CheckpointError(f"{path}: {name} has the shape {tuple(source.shape)}, "
                                  f"the model {tuple(tensor.shape)}")
        else:
            tensor.copy_(source)
    return WarmStart(Path(path), int(payload.get("step", 0)), pieces)
