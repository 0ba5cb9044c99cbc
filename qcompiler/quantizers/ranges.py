"""Where a grid sits: range searches over weights and observed activations, and the observer.

Rule: a range search minimises the mean ``|x - fq(x)|^p`` of the values it is given, per row
(channel): shrunk min-max ranges for symmetric and activation grids (``search_range``), a joint
search over width and zero point for asymmetric weight grids (``search_grid``).
"""

from __future__ import annotations

import math

import torch

from qcompiler.config import ACT_MSE_P
from qcompiler.quantizers.grid import QSpec, centered_levels, midrise_quant, params_from_range, quantize_int

# The error the range searches minimise: mean |x - fq(x)|^p. p = 2.4 weighs the clipped tail a little
# more than squared error: for activations (by default: the ``a_mse_p`` knob, ACT_MSE_P) and weight
# grids of fewer than WIDE_WEIGHT_BITS bits; 2 for wider weight grids (chosen on validation data:
# bench/README.md, "range search exponents").
WEIGHT_MSE_P = 2.4
WIDE_WEIGHT_MSE_P = 2.0
WIDE_WEIGHT_BITS = 7


def weight_mse_p(bits: int) -> float:
    """The range search exponent of a weight grid of ``bits`` bits."""
    return WIDE_WEIGHT_MSE_P if bits >= WIDE_WEIGHT_BITS else WEIGHT_MSE_P


def _lp_error(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, spec: QSpec, p: float = ACT_MSE_P) -> torch.Tensor:
    """Mean |x - fq(x)|^p per row of ``x`` (rows = channels) for the grid given by [lo, hi]."""
    scale, zp = params_from_range(lo, hi, spec)
    if spec.midrise:
        xq = midrise_quant(x, scale[:, None], spec.qmin, spec.qmax)
    else:
        xq = (quantize_int(x, scale[:, None], zp[:, None], spec.qmin, spec.qmax) - zp[:, None]) * scale[:, None]
    return (x - xq).abs_().pow_(p).mean(dim=1)


@torch.no_grad()
def search_range(x2d: torch.Tensor, spec: QSpec, steps: int = 80, p: float = ACT_MSE_P
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row [lo, hi] minimising the Lp quantization error over shrunk min-max ranges.

    Candidates are ``alpha * [min, max]`` for ``alpha`` in (0, 1]; the best alpha per row wins.
    """
    lo0 = x2d.min(dim=1).values.clamp(max=0)
    hi0 = x2d.max(dim=1).values.clamp(min=0)
    best_err = torch.full_like(lo0, math.inf)
    best_lo, best_hi = lo0.clone(), hi0.clone()
    for i in range(steps):
        alpha = 1.0 - i / steps * 0.8
        lo, hi = lo0 * alpha, hi0 * alpha
        err = _lp_error(x2d, lo, hi, spec, p)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_lo = torch.where(better, lo, best_lo)
        best_hi = torch.where(better, hi, best_hi)
    return best_lo, best_hi


@torch.no_grad()
def search_grid(x2d: torch.Tensor, spec: QSpec, steps: int = 10, p: float = ACT_MSE_P
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (scale, zero point) of an asymmetric grid minimising the mean ``|x - fq(x)|^p``.

    A joint search: the grid's width runs over fractions of the row's range and, for each, zero
    points of the spec are tried (integers, and half-integers with ``zp_halves``), so a skewed row
    can place more levels on its heavy side than a grid stretched over ``[min, max]`` would, and a
    symmetric row can take the midrise grid. Coarse to fine: ``steps`` fractions ``i / steps`` with
    every zero point, then ``2 steps + 1`` fractions within one coarse step of each row's best, at
    ten times the resolution, with the zero points within 2 of the row's best.
    """
    if spec.symmetric or spec.midrise:
        raise ValueError("search_grid is for asymmetric grids")
    if spec.zp_halves and not spec.centered:
        raise ValueError("half-integer zero points need a centered grid")
    lo0 = x2d.min(dim=1).values.clamp(max=0)
    hi0 = x2d.max(dim=1).values.clamp(min=0)
    width = (hi0 - lo0).clamp(min=1e-8)
    levels = spec.qmax - spec.qmin
    zstep = 0.5 if spec.zp_halves else 1.0
    best_err = torch.full_like(lo0, math.inf)
    best_f, best_z = torch.ones_like(lo0), torch.zeros_like(lo0)

    def trial(frac: torch.Tensor, zt: torch.Tensor) -> None:
        nonlocal best_err, best_f, best_z
        s = (width * frac / levels).clamp(min=1e-8)
        d = x2d - centered_levels(x2d, s, zt, spec.qmin, spec.qmax, 0) * s[:, None]
        err = d.abs_().pow_(p).mean(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_f = torch.where(better, frac, best_f)
        best_z = torch.where(better, zt, best_z)

    for i in range(1, steps + 1):
        for j in range(int(levels / zstep) + 1):
            trial(torch.full_like(lo0, i / steps), torch.full_like(lo0, spec.qmin + j * zstep))
    coarse_f, coarse_z = best_f.clone(), best_z.clone()
    for k in range(-steps, steps + 1):
        frac = (coarse_f + k / (10 * steps)).clamp(min=0.1 / steps, max=1.0)
        for dz in range(-int(2 / zstep), int(2 / zstep) + 1):
            trial(frac, (coarse_z + dz * zstep).clamp(spec.qmin, spec.qmax))
    return (width * best_f / levels).clamp(min=1e-8), best_z


class RangeObserver:
    """Collects running min/max and a bounded random sample of an activation's values."""

    def __init__(self, per_batch: int = 32768, max_samples: int = 1 << 19, seed: int = 0) -> None:
        self.lo = math.inf
        self.hi = -math.inf
        self.per_batch = per_batch
        self.max_samples = max_samples
        self.samples: list[torch.Tensor] = []
        self.gen = torch.Generator().manual_seed(seed)
        self.count = 0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().float().reshape(-1)
        if x.numel() == 0:
            return
        self.lo = min(self.lo, float(x.min()))
        self.hi = max(self.hi, float(x.max()))
        if x.numel() > self.per_batch:
            idx = torch.randint(0, x.numel(), (self.per_batch,), generator=self.gen)
            x = x[idx]
        self.samples.append(x.clone())
        self.count += 1

    def sample(self) -> torch.Tensor:
        s = torch.cat(self.samples) if self.samples else torch.zeros(1)
        if s.numel() > self.max_samples:
            s = s[torch.randperm(s.numel(), generator=self.gen)[: self.max_samples]]
        return torch.cat([s, torch.tensor([self.lo, self.hi])])
