"""A scratch tensor that a training kernel reuses from batch to batch.

The CPU training kernel of the vocabulary layer (`rnmt.nn.loss.VocabularyLoss`) writes its
largest activations, tens of megabytes per batch, into storage the model keeps, instead of
asking for it afresh. Freshly allocated memory that large comes from the kernel as new
zeroed pages (glibc hands allocations above its mmap threshold, at most 32 MB, straight to
mmap), and on the development machine those page faults cost as much as the arithmetic that
fills the pages.
"""

from __future__ import annotations

import math
import weakref

from torch import Tensor


class ScratchBuffer:
    """Storage lent to one pass at a time, until its backward has run (`release`) or its
    graph is freed: a forward while it is lent (two losses in one graph) gets a fresh
    tensor instead, so nothing a pending backward needs is overwritten. The storage grows to
    the largest request and is kept."""

    def __init__(self) -> None:
        self._storage: Tensor | None = None
        self._holder: weakref.ref | None = None

    def take(self, shape: tuple[int, ...], like: Tensor, holder: object) -> Tensor:
        """An uninitialised tensor of `shape` with `like`'s dtype and device, lent to
        `holder` (an autograd context: when it is freed without a backward, the buffer is
        free again)."""
        if self._holder is not None and self._holder() is not None:
            return like.new_empty(shape)
        size = math.prod(shape)
        if (self._storage is None or self._storage.numel() < size
                or self._storage.dtype != like.dtype or self._storage.device != like.device):
            self._storage = None  # the old one goes before the new one comes
            self._storage = like.new_empty(size)
        self._holder = weakref.ref(holder)
        return self._storage[:size].view(shape)

    def release(self) -> None:
        self._holder = None
