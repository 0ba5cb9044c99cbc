"""QDrop's keep-masks and the memory-layout helpers reconstruction shares with them.

Masks follow the memory layout of the tensor they mask (contiguous or channels-last), so
elementwise kernels walk both together; the activation cache and the trainer's row sampling keep
that layout too.
"""

from __future__ import annotations

import torch


class MaskPool:
    """Bernoulli(p) keep-masks for QDrop, cut from one pre-drawn pool at random offsets.

    Drawing a fresh uniform tensor per activation per step costs as much as the convolutions on
    CPU; slices of a large pool (re-offset by the seeded generator every call) are as good for
    dropping and deterministic for a given seed. The pool is redrawn, once, at twice the size of a
    mask larger than half of it. Masks are float 0/1 tensors (1 = keep float): on CPU, arithmetic
    with a float mask is several times faster than ``where`` with a bool one.
    """

    def __init__(self, p: float, generator: torch.Generator, size: int = 1 << 23) -> None:
        self.p = p
        self.gen = generator
        self.pool = self._draw(size)

    def _draw(self, size: int) -> torch.Tensor:
        return (torch.rand(size, generator=self.gen) < self.p).float()

    def mask(self, like: torch.Tensor) -> torch.Tensor:
        """A mask of ``like``'s shape, laid out in memory as ``like`` is (see ``empty_like``)."""
        n = like.numel()
        if 2 * n > self.pool.numel():  # keep at least n + 1 offsets: redraw the pool at twice the mask
            self.pool = self._draw(2 * n)
        start = int(torch.randint(0, self.pool.numel() - n + 1, (1,), generator=self.gen))
        return in_layout_of(self.pool[start:start + n], like)


def _channels_last(t: torch.Tensor) -> bool:
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def in_layout_of(flat: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``flat`` (1-D, ``like.numel()`` values) viewed with ``like``'s shape and memory order.

    For a contiguous ``like`` this is ``flat.view(shape)``; for a channels-last one the values fill
    memory in the same order, so an elementwise kernel may walk both tensors' memory together.
    """
    if _channels_last(like):
        n, c, h, w = like.shape
        return flat.view(n, h, w, c).permute(0, 3, 1, 2)
    return flat.view(like.shape)


def memory_order(t: torch.Tensor) -> torch.Tensor:
    """The values of ``t`` as one vector in memory order (``in_layout_of``'s inverse): a view for
    contiguous and channels-last tensors, a copy otherwise."""
    return t.permute(0, 2, 3, 1).reshape(-1) if _channels_last(t) else t.reshape(-1)


def take_rows(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``t[idx]`` (rows along dim 0) in ``t``'s memory layout, the same values.

    Each row of a contiguous or channels-last tensor is one block of memory; ``index_select`` on
    that two-dimensional view (``memory_order``'s, one row per sample) copies whole blocks, where
    advanced indexing of the four-dimensional channels-last tensor walks it element by element.
    """
    if t.dim() == 0 or not (t.is_contiguous() or _channels_last(t)):
        return t[idx]
    rows = memory_order(t).view(t.shape[0], -1).index_select(0, idx)
    if _channels_last(t):
        n, c, h, w = t.shape
        return rows.view(idx.numel(), h, w, c).permute(0, 3, 1, 2)
    return rows.view(idx.numel(), *t.shape[1:])
