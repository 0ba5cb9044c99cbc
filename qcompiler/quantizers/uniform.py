"""Uniform affine quantization: the numerics every integer target executes.

Rule: ``q = clamp(round(x / s) + z, qmin, qmax)`` and ``x_hat = (q - z) * s`` with round half to
even (as ONNX QuantizeLinear). Values of fewer than 8 bits travel in 8-bit containers: a 4-bit
unsigned activation uses ``[qmin, qmax] = [0, 15]`` inside uint8, a 4-bit signed weight
``[-8, 7]`` inside int8. Scales are per tensor, or per channel along ``axis``.

A *midrise* weight grid (``QSpec.midrise``) has no zero level: ``x_hat = (q + 1/2) * s`` with
``q = clamp(floor(x / s), qmin, qmax)``, the ``2**bits`` levels ``+-s/2 ... +-(2**(bits-1) - 1/2) s``
placed symmetrically. For a symmetric weight distribution that is the better uniform grid (a 2-bit
zero-point grid has levels ``{-2, -1, 0, 1} s``, the midrise one ``{-1.5, -0.5, 0.5, 1.5} s``). It
is deployed exactly as the odd integers ``2q + 1`` with step ``s / 2`` and zero point 0, which
costs one more bit of storage.

A *centered* asymmetric weight grid (``QSpec.centered``) has a zero point per channel like any
asymmetric grid, but stores the integers ``q - z`` with zero point 0: the levels of a ``bits``-wide
asymmetric grid are whole multiples of ``s`` in ``[qmin - z, qmax - z]``, which a symmetric
container of ``bits + 1`` bits holds exactly. Integer kernels that accept only a zero weight zero
point (ONNX Runtime's QLinearConv across channels) so run per-channel asymmetric weights. With
``QSpec.zp_halves`` a zero point may also be a half-integer: the levels ``(k - z) s`` of that
channel are then odd multiples of ``s / 2``, stored as ``2 (k - z)`` at step ``s / 2`` (two bits
more than ``bits``). Such a grid contains the midrise grid (``z = -1/2``) and every integer zero
point, and the weight search picks per channel. The rule for a centered grid with
``z = zi + o`` (``zi`` integer, ``o`` in ``{0, 1/2}``) is ``k = clamp(round(x / s + o) + zi, qmin, qmax)``,
``x_hat = (k - z) s``; for an integer zero point that is the affine rule above.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from qcompiler.quantizers.qdrop import MaskSource, keep_mask, qdrop_mix


@dataclass(frozen=True)
class QSpec:
    """How one tensor is quantized: width, container sign, symmetry and channel axis."""

    bits: int
    signed: bool
    symmetric: bool
    axis: int | None = None
    midrise: bool = False  # zero-free weight grid; its stored integers need bits + 1
    centered: bool = False  # asymmetric grid stored as q - z with zero point 0; needs bits + 1
    zp_halves: bool = False  # centered grid whose zero points may be half-integers; needs bits + 2

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1 if self.signed else (1 << self.bits) - 1

    def describe(self) -> str:
        sign = "s" if self.signed else "u"
        sym = "midrise" if self.midrise else "sym" if self.symmetric else "asym-centered" if self.centered else "asym"
        gran = f"per-channel(axis={self.axis})" if self.axis is not None else "per-tensor"
        return f"{sign}{self.bits} {sym} {gran}"


def _bcast(t: torch.Tensor, x: torch.Tensor, axis: int | None) -> torch.Tensor:
    if axis is None or t.dim() == 0:
        return t
    shape = [1] * x.dim()
    shape[axis] = -1
    return t.reshape(shape)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round half to even with a straight-through gradient."""
    return (torch.round(x) - x).detach() + x


def fake_quant(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
               axis: int | None = None) -> torch.Tensor:
    """Quantize and dequantize ``x`` (differentiable: straight-through round, LSQ-style scale grad)."""
    s = _bcast(scale, x, axis)
    z = _bcast(zero_point, x, axis)
    q = torch.clamp(round_ste(x / s) + z, qmin, qmax)
    return (q - z) * s


def split_zero_point(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``z = zi + o``: the integer part and the offset ``o`` in [0, 1) (1/2 for a half-integer)."""
    zi = torch.floor(z)
    return zi, z - zi


def centered_levels(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
                    axis: int | None = None, rnd=torch.round) -> torch.Tensor:
    """``clamp(rnd(x / s + o) + zi, qmin, qmax) - z`` for ``z = zi + o``: the grid level in steps."""
    s = _bcast(scale, x, axis)
    z = _bcast(zero_point, x, axis)
    zi, o = split_zero_point(z)
    return torch.clamp(rnd(x / s + o) + zi, qmin, qmax) - z


def centered_quant(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
                   axis: int | None = None) -> torch.Tensor:
    """``(clamp(round(x / s + o) + zi, qmin, qmax) - z) * s`` for ``z = zi + o`` (straight-through round)."""
    return centered_levels(x, scale, zero_point, qmin, qmax, axis, round_ste) * _bcast(scale, x, axis)


def midrise_quant(x: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int, axis: int | None = None
                  ) -> torch.Tensor:
    """``(clamp(floor(x / s), qmin, qmax) + 1/2) * s``: the nearest level of the zero-free grid."""
    s = _bcast(scale, x, axis)
    return (torch.clamp(torch.floor(x / s), qmin, qmax) + 0.5) * s


def quantize_int(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
                 axis: int | None = None) -> torch.Tensor:
    """The stored integers ``clamp(round(x / s) + z, qmin, qmax)`` (as float tensor of integers)."""
    s = _bcast(scale, x, axis)
    z = _bcast(zero_point, x, axis)
    return torch.clamp(torch.round(x / s) + z, qmin, qmax)


def params_from_range(lo: torch.Tensor, hi: torch.Tensor, spec: QSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point that map ``[lo, hi]`` (widened to include 0) onto the spec's grid."""
    lo = torch.minimum(lo, torch.zeros_like(lo))
    hi = torch.maximum(hi, torch.zeros_like(hi))
    levels = spec.qmax - spec.qmin
    if spec.symmetric:
        amax = torch.maximum(-lo, hi)
        scale = torch.clamp(amax / (levels / 2), min=1e-8)
        zp = torch.zeros_like(scale) if spec.signed else torch.full_like(scale, float((spec.qmax + spec.qmin + 1) // 2))
        if not spec.signed and bool((lo >= 0).all()):
            zp = torch.zeros_like(scale)
            scale = torch.clamp(hi / levels, min=1e-8)
        return scale, zp
    scale = torch.clamp((hi - lo) / levels, min=1e-8)
    zp = torch.clamp(spec.qmin - torch.round(lo / scale), spec.qmin, spec.qmax)
    return scale, zp


# The error the range searches minimise: mean |x - fq(x)|^p. p = 2.4 (QDrop's observers) weighs the
# clipped tail a little more than squared error. Chosen on validation data (bench/README.md, "range
# search exponents"): 2.4 for activations and for weight grids of fewer than WIDE_WEIGHT_BITS bits
# (ResNet-20 W4A4 rtn: 82.57 against 79.98 with 2 for the weights), 2 for wider weight grids
# (EfficientNet-Lite0 W8A8 rtn, 7-bit weights: 82.00 against 81.69).
ACT_MSE_P = 2.4
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


class UniformQuantizer(nn.Module):
    """A fake quantizer with a learnable step size.

    Modes: ``"observe"`` passes values through and records them; ``"quant"`` fake-quantizes;
    ``"off"`` passes values through. ``scale`` is a Parameter (frozen until a method trains it);
    ``zero_point`` is a buffer holding integers.
    """

    def __init__(self, spec: QSpec, channels: int | None = None) -> None:
        super().__init__()
        self.spec = spec
        shape = (channels,) if spec.axis is not None else ()
        self.scale = nn.Parameter(torch.ones(shape), requires_grad=False)
        self.register_buffer("zero_point", torch.zeros(shape))
        self.mode = "off"
        self.observer: RangeObserver | None = None
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
                self.observer = RangeObserver()
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
    def init_from_observer(self, method: str, percentile: float = 99.99) -> None:
        """Initialise an activation quantizer from what it observed: minmax, mse or percentile."""
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
            lo2, hi2 = search_range(obs.sample()[None, :], self.spec, p=ACT_MSE_P)
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
            scale, zp = search_grid(x2d, self.spec, p=weight_mse_p(self.spec.bits))
            self.scale.data = scale.reshape(self.scale.shape).clone()
            self.zero_point.data = zp.reshape(self.zero_point.shape).clone()
            return
        elif method == "mse":
            lo, hi = search_range(x2d, self.spec, p=weight_mse_p(self.spec.bits))
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
        if self.spec.midrise:
            s = _bcast(self.scale, x, self.spec.axis)
            return 2.0 * torch.clamp(torch.floor(x / s), self.qmin, self.qmax) + 1.0
        if self.spec.centered:
            return centered_levels(x, self.scale, self.zero_point, self.qmin, self.qmax, self.spec.axis) \
                * _bcast(self.store_factor(), x, self.spec.axis)
        return quantize_int(x, self.scale, self.zero_point, self.qmin, self.qmax, self.spec.axis)

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
