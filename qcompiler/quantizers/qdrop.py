"""QDrop's dropping rule, as the quantizers apply it.

Rule: during reconstruction each element of a quantized activation stays float with probability
``p`` (QDrop), else takes its quantized value. Where the keep-masks come from (a pool cut at random
offsets, in the tensor's memory layout) is the reconstruction trainer's business
(``qcompiler.passes.reconstruct.qdrop``); a quantizer is handed a source with ``mask(like)``.
"""

from __future__ import annotations

from typing import Protocol

import torch


class MaskSource(Protocol):
    def mask(self, like: torch.Tensor) -> torch.Tensor:
        """A float 0/1 keep-mask (1 = stay float) of ``like``'s shape and memory layout."""
        ...


def keep_mask(like: torch.Tensor, p: float, masks: MaskSource | None = None) -> torch.Tensor | None:
    """QDrop's Bernoulli(``p``) keep-mask for ``like`` (its shape and memory layout), float 1 = stay
    float; None when ``p <= 0`` (nothing kept)."""
    if p <= 0.0:
        return None
    if p >= 1.0:
        return torch.ones_like(like)
    return masks.mask(like) if masks is not None else (torch.rand_like(like) < p).float()


def mix(x: torch.Tensor, xq: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``x`` where ``keep`` is 1, ``xq`` where it is 0: ``lerp`` is exact at both ends and is one pass."""
    return torch.lerp(xq, x, keep)


def qdrop_mix(x: torch.Tensor, xq: torch.Tensor, p: float, masks: MaskSource | None = None) -> torch.Tensor:
    """QDrop: each element is ``x`` (float) with probability ``p``, else ``xq`` (quantized)."""
    if p <= 0.0:
        return xq
    if p >= 1.0:
        return x
    return mix(x, xq, keep_mask(x, p, masks))
