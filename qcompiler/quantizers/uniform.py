"""UniformQuantizer: the fake quantizer of the uniform grids in ``grid``, calibrated by ``ranges``.

Rule: in mode ``"quant"`` it computes ``grid``'s rule for its spec (affine, midrise or centered);
``"observe"`` records values for calibration; ``"off"`` passes values through. QDrop (``drop_prob``)
keeps a random share of the elements float while reconstructing.
"""

from __future__ import annotations

import torch
from torch import nn

from qcompiler.config import ACT_MSE_P
from qcompiler.quantizers import ranges
from qcompiler.quantizers.grid import (
    QSpec,
    bcast,
    centered_quant,
    fake_quant,
    midrise_quant,
    params_from_range,
    split_zero_point,
)
from qcompiler.quantizers.qdrop import MaskSource, keep_mask, qdrop_mix


class UniformQuantizer(nn.Module):
    """A fake quantizer with a learnable step size.

    Modes: ``"observe"`` passes values through and records them; ``"quant"`` fake-quantizes;
    ``"off"`` passes values through. ``scale`` is a Parameter (frozen until a method trains it);
    ``zero_point`` is a buffer holding integers.
    """

    integer_form = True  # its values are a uniform grid's: integer targets store them

    def __init__(self, spec: QSpec, channels: int | None = None) -> None:
        super().__init__()
        self.spec = spec
        shape = (channels,) if spec.axis is not None else ()
        self.scale = nn.Parameter(torch.ones(shape), requires_grad=False)
        self.register_buffer("zero_point", torch.zeros(shape))
        self.mode = "off"
        self.observer: ranges.RangeObserver | None = None
        self.drop_prob = 0.0  # QDrop: probability of keeping an element float (training only)
        self.drop_masks: MaskSource | None = None

    @property
    def qmin(self) -> int:
        return self.spec.qmin

    @property
    def qmax(self) -> int:
        return self.spec.qmax

    def extra_repr(self) -> str:
        return f"{self.spec.describe()}, mode={self.mode}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "quant":
            if self.spec.centered:
                return self.drop(x, centered_quant(x, self.scale, self.zero_point, self.qmin, self.qmax,
                                                   self.spec.axis))
            if self.spec.midrise:
                return self.drop(x, midrise_quant(x, self.scale, self.qmin, self.qmax, self.spec.axis))
            return self.drop(x, fake_quant(x, self.scale, self.zero_point, self.qmin, self.qmax, self.spec.axis))
        if self.mode == "observe":
            if self.observer is None:
                self.observer = ranges.RangeObserver()
            self.observer.update(x)
        return x

    def drop(self, x: torch.Tensor, xq: torch.Tensor) -> torch.Tensor:
        """QDrop: keep each element of ``x`` float with probability ``drop_prob`` (else quantized)."""
        return qdrop_mix(x, xq, self.drop_prob, self.drop_masks)

    def keep_mask(self, x: torch.Tensor) -> torch.Tensor | None:
        """This step's QDrop keep-mask for ``x`` (None when every element is quantized)."""
        return keep_mask(x, self.drop_prob, self.drop_masks)

    @torch.no_grad()
    def set_range(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """Set scale and zero point from a value range."""
        scale, zp = params_from_range(lo.float(), hi.float(), self.spec)
        self.scale.data = scale.reshape(self.scale.shape).clone()
        self.zero_point.data = zp.reshape(self.zero_point.shape).clone()

    @torch.no_grad()
    def init_from_observer(self, method: str, percentile: float = 99.99, p: float = ACT_MSE_P) -> None:
        """Initialise an activation quantizer from what it observed: minmax, mse (the range minimising
        the mean ``|x - fq(x)|^p``) or percentile."""
        if self.observer is None or self.observer.count == 0:
            raise RuntimeError("the quantizer observed no values")
        obs = self.observer
        if method == "minmax":
            lo, hi = torch.tensor(obs.lo), torch.tensor(obs.hi)
        elif method == "percentile":
            s = obs.sample()
            lo = torch.quantile(s, 1 - percentile / 100).clamp(max=0)
            hi = torch.quantile(s, percentile / 100).clamp(min=0)
        elif method == "mse":
            lo2, hi2 = ranges.search_range(obs.sample()[None, :], self.spec, p=p)
            lo, hi = lo2[0], hi2[0]
        else:
            raise ValueError(f"unknown activation init {method!r}")
        self.set_range(lo, hi)
        self.observer = None

    @torch.no_grad()
    def init_from_tensor(self, w: torch.Tensor, method: str) -> None:
        """Initialise a weight quantizer from the weight itself: minmax or mse, per channel or tensor."""
        axis = self.spec.axis
        x2d = w.detach().float().movedim(axis, 0).reshape(w.shape[axis], -1) if axis is not None \
            else w.detach().float().reshape(1, -1)
        if method == "minmax":
            lo, hi = x2d.min(dim=1).values, x2d.max(dim=1).values
        elif method == "mse" and not self.spec.symmetric:
            scale, zp = ranges.search_grid(x2d, self.spec, p=ranges.weight_mse_p(self.spec.bits))
            self.scale.data = scale.reshape(self.scale.shape).clone()
            self.zero_point.data = zp.reshape(self.zero_point.shape).clone()
            return
        elif method == "mse":
            lo, hi = ranges.search_range(x2d, self.spec, p=ranges.weight_mse_p(self.spec.bits))
        else:
            raise ValueError(f"unknown weight init {method!r}")
        if self.spec.symmetric:
            amax = torch.maximum(-lo, hi)
            lo, hi = -amax, amax
        if axis is None:
            lo, hi = lo[0], hi[0]
        self.set_range(lo, hi)

    @torch.no_grad()
    def int_repr(self, x: torch.Tensor) -> torch.Tensor:
        """The integers stored for ``x`` (float tensor of whole numbers), read with ``stored_scale``.

        Within [qmin, qmax]; for a midrise grid the odd integers ``2q + 1``; for a centered grid
        ``k - z``, doubled in channels whose zero point is a half-integer.
        """
        return self.level_store(self.grid_ints(x), x)

    def grid_ints(self, x: torch.Tensor) -> torch.Tensor:
        """The grid integers ``q`` in ``[qmin, qmax]`` that round ``x`` to nearest: ``floor(x / s)`` on a
        midrise grid, else ``round(x / s + o) + zi`` for the zero point ``z = zi + o``."""
        s = bcast(self.scale, x, self.spec.axis)
        if self.spec.midrise:
            return torch.clamp(torch.floor(x / s), self.qmin, self.qmax)
        zi, o = split_zero_point(bcast(self.zero_point, x, self.spec.axis))
        return torch.clamp(torch.round(x / s + o) + zi, self.qmin, self.qmax)

    def level_values(self, q: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The values of grid integers ``q`` (shaped as ``x``): ``(q + 1/2) s`` midrise, else ``(q - z) s``.
        Differentiable in ``q`` and in the step."""
        s = bcast(self.scale, x, self.spec.axis)
        if self.spec.midrise:
            return (q + 0.5) * s
        return (q - bcast(self.zero_point, x, self.spec.axis)) * s

    def level_store(self, q: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The integers stored for grid integers ``q``, read with ``stored_scale()``: ``2q + 1``
        midrise, ``(q - z)`` times ``store_factor()`` centered, ``q`` otherwise; so that
        ``(level_store(q) - stored_zero_point()) * stored_scale()`` is ``level_values(q)`` exactly."""
        if self.spec.midrise:
            return 2.0 * q + 1.0
        if self.spec.centered:
            axis = self.spec.axis
            return (q - bcast(self.zero_point, x, axis)) * bcast(self.store_factor(), x, axis)
        return q

    def store_factor(self) -> torch.Tensor:
        """Per channel, how many stored steps one grid step is: 2 for midrise grids and half-integer zero points."""
        if self.spec.midrise:
            return torch.full_like(self.zero_point, 2.0)
        if self.spec.centered:
            return 1.0 + (split_zero_point(self.zero_point)[1] != 0).to(self.zero_point.dtype)
        return torch.ones_like(self.zero_point)

    def stored_scale(self) -> torch.Tensor:
        """The step of the stored integers: ``scale / store_factor()``."""
        if not (self.spec.midrise or self.spec.centered):
            return self.scale  # factor 1 (read by the bias quantizer on every step: no division)
        return self.scale / self.store_factor()

    def stored_zero_point(self) -> torch.Tensor:
        """The zero point of the stored integers: 0 for midrise and centered grids."""
        return torch.zeros_like(self.zero_point) if self.spec.midrise or self.spec.centered else self.zero_point
