"""Uniform affine quantization grids: the numerics every integer target executes.

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

from dataclasses import dataclass

import torch


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


def bcast(t: torch.Tensor, x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """``t`` (per-channel along ``axis`` of ``x``, or a scalar) shaped to broadcast against ``x``."""
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
    s = bcast(scale, x, axis)
    z = bcast(zero_point, x, axis)
    q = torch.clamp(round_ste(x / s) + z, qmin, qmax)
    return (q - z) * s


def split_zero_point(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``z = zi + o``: the integer part and the offset ``o`` in [0, 1) (1/2 for a half-integer)."""
    zi = torch.floor(z)
    return zi, z - zi


def centered_levels(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
                    axis: int | None = None, rnd=torch.round) -> torch.Tensor:
    """``clamp(rnd(x / s + o) + zi, qmin, qmax) - z`` for ``z = zi + o``: the grid level in steps."""
    s = bcast(scale, x, axis)
    z = bcast(zero_point, x, axis)
    zi, o = split_zero_point(z)
    return torch.clamp(rnd(x / s + o) + zi, qmin, qmax) - z


def centered_quant(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
                   axis: int | None = None) -> torch.Tensor:
    """``(clamp(round(x / s + o) + zi, qmin, qmax) - z) * s`` for ``z = zi + o`` (straight-through round)."""
    return centered_levels(x, scale, zero_point, qmin, qmax, axis, round_ste) * bcast(scale, x, axis)


def midrise_quant(x: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int, axis: int | None = None
                  ) -> torch.Tensor:
    """``(clamp(floor(x / s), qmin, qmax) + 1/2) * s``: the nearest level of the zero-free grid."""
    s = bcast(scale, x, axis)
    return (torch.clamp(torch.floor(x / s), qmin, qmax) + 0.5) * s


def quantize_int(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
                 axis: int | None = None) -> torch.Tensor:
    """The stored integers ``clamp(round(x / s) + z, qmin, qmax)`` (as float tensor of integers)."""
    s = bcast(scale, x, axis)
    z = bcast(zero_point, x, axis)
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
