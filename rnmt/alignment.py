"""Hard word alignments from attention weights, in Pharaoh `src-tgt` format.

Attention is over sentencepiece pieces; users align words. A piece that starts with `▁`
starts a new word (sentencepiece marks whitespace that way), so pieces map to the
whitespace-separated words of the text. For target word j and source word i:

    A[j, i] = mean over pieces of target word j of Σ over pieces of source word i of α_{t,s}

and target word j is aligned to argmax_i A[j, i] (Bahdanau et al. 2015, fig. 3 shows α).
"""

from __future__ import annotations

import torch
from torch import Tensor

WORD_START = "\u2581"  # ▁


def word_of_pieces(pieces: list[str]) -> list[int]:
    """The word index of every piece: ["▁the", "▁ca", "t"] -> [0, 1, 1]."""
    words, current = [], -1
    for i, piece in enumerate(pieces):
        if piece.startswith(WORD_START) or i == 0:
            current += 1
        words.append(current)
    return words


def word_attention(src_pieces: list[str], tgt_pieces: list[str], attention: Tensor) -> Tensor:
    """Piece attention (>= len(tgt_pieces), >= len(src_pieces)) -> word attention
    (tgt_words, src_words); rows/columns beyond the pieces (`</s>`) are left out."""
    att = attention[: len(tgt_pieces), : len(src_pieces)].float()
    src_words = torch.tensor(word_of_pieces(src_pieces), dtype=torch.long)
    tgt_words = torch.tensor(word_of_pieces(tgt_pieces), dtype=torch.long)
    n_src = int(src_words.max()) + 1 if len(src_pieces) else 0
    n_tgt = int(tgt_words.max()) + 1 if len(tgt_pieces) else 0
    by_src = torch.zeros(att.size(0), n_src).index_add_(1, src_words, att)
    summed = torch.zeros(n_tgt, n_src).index_add_(0, tgt_words, by_src)
    counts = torch.bincount(tgt_words, minlength=n_tgt).clamp(min=1).unsqueeze(1)
    return summed / counts


def hard_alignment(src_pieces: list[str], tgt_pieces: list[str], attention: Tensor
                   ) -> list[tuple[int, int]]:
    """(source word, target word) pairs: each target word to its most attended source word."""
    if not src_pieces or not tgt_pieces:
        return []
    words = word_attention(src_pieces, tgt_pieces, attention)
    return [(int(i), j) for j, i in enumerate(words.argmax(dim=1).tolist())]


def pharaoh(pairs: list[tuple[int, int]]) -> str:
    """[(0, 0), (2, 1)] -> "0-0 2-1"."""
    return " ".join(f"{i}-{j}" for i, j in sorted(pairs, key=lambda p: (p[1], p[0])))
