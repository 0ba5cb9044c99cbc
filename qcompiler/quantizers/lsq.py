"""LSQ: an activation quantizer whose step size is trained (Esser et al. 2020, "Learned Step Size").

Rule: the forward is ``fake_quant`` unchanged, ``x_hat = (clamp(round(x / s) + z, qmin, qmax) - z) * s``
(round half to even, straight-through), but the gradient reaching ``s`` is multiplied by
``g = 1 / sqrt(n * (qmax - qmin))``, where ``n`` is the number of elements sharing one step (all of
``x`` for a per-tensor quantizer). Per element, ``d x_hat / d s`` is ``round(x / s) - x / s`` inside
the range, ``qmin - z`` below and ``qmax - z`` above; LSQ sums these and scales by ``g``.

``qmax - qmin`` stands for the paper's ``Q_P``: the same for unsigned activations, twice it for
signed ones (a constant factor on ``g`` that Adam mostly absorbs). The zero point is not trained:
it stays the integer the quantizer was calibrated with, which is what QuantizeLinear stores
(LSQ+ learns an offset; here an asymmetric range moves only through ``s``).

The forward and backward are one autograd function (``lsq_fake_quant``) that also applies QDrop's
keep-mask. Composed from autograd's elementwise ops (divide, straight-through round, clamp, where),
the same computation made about a dozen passes over every activation, and on CPU those passes,
not the convolutions, dominated reconstruction time. The torch version here makes fewer; for
per-tensor steps a C kernel (``native``) makes one pass each way, with bit-identical values.
"""

from __future__ import annotations

import math

import torch

from qcompiler.quantizers import native
from qcompiler.quantizers.family import ParamGroup, Trainable
from qcompiler.quantizers.grid import bcast, round_ste
from qcompiler.quantizers.qdrop import mix
from qcompiler.quantizers.uniform import UniformQuantizer


class _LSQFakeQuant(torch.autograd.Function):
    """``mix(x, clamp(round(x / s), qmin - z, qmax - z) * s, keep)`` with the LSQ step gradient.

    ``clamp(round(x / s), qmin - z, qmax - z)`` equals ``clamp(round(x / s) + z, qmin, qmax) - z``
    exactly (whole numbers far below 2**24), so the value is ``fake_quant`` bit for bit. Masks are
    float 0/1 tensors and the backward is products and dot products, no ``where``: on CPU that is
    several times faster than bool masks.
    """

    @staticmethod
    def forward(ctx, x, scale, lo, hi, factor, axis, keep):
        s = bcast(scale, x, axis)
        xs = x / s
        r = torch.round(xs)
        qz = torch.clamp(r, lo, hi)
        out = qz * s
        if keep is not None:
            out = mix(x, out, keep)
        ctx.save_for_backward(xs, r, qz, keep)
        ctx.factor, ctx.axis, ctx.scale_shape = factor, axis, scale.shape
        return out

    @staticmethod
    def backward(ctx, g):
        xs, r, qz, keep = ctx.saved_tensors
        # 1 where the clamp bit (|r - qz| >= 1 there), 0 where the straight-through gradient passes.
        clipped = (r - qz).abs_().clamp_(max=1.0)
        gq = g if keep is None else g * (1.0 - keep)  # the part that reached the quantized branch
        gq_clipped = gq * clipped
        gx = g - gq_clipped if ctx.needs_input_grad[0] else None
        gs = None
        if ctx.needs_input_grad[1]:
            # d out / d s = qz - xs * (1 - clipped), summed against gq.
            if ctx.axis is None:
                gs = (torch.dot(gq.reshape(-1), (qz - xs).reshape(-1))
                      + torch.dot(gq_clipped.reshape(-1), xs.reshape(-1)))
            else:
                dims = [d for d in range(g.dim()) if d != ctx.axis % g.dim()]
                gs = (gq * (qz - xs) + gq_clipped * xs).sum(dims)
            gs = (gs * ctx.factor).reshape(ctx.scale_shape)
        return gx, gs, None, None, None, None, None


class _NativeLSQFakeQuant(torch.autograd.Function):
    """The same function as ``_LSQFakeQuant`` (per-tensor step) in one C pass each way (``native``)."""

    @staticmethod
    def forward(ctx, x, scale, lo, hi, factor, keep):
        s = float(scale)
        out, code = native.lsq_forward(x, keep, s, lo, hi)
        ctx.save_for_backward(x, code)
        ctx.s, ctx.lo, ctx.hi, ctx.factor, ctx.scale_shape = s, lo, hi, factor, scale.shape
        return out

    @staticmethod
    def backward(ctx, g):
        x, code = ctx.saved_tensors
        gx, gs = native.lsq_backward(g, x, code, ctx.s, ctx.lo, ctx.hi)
        gs = torch.full(ctx.scale_shape, gs * ctx.factor) if ctx.needs_input_grad[1] else None
        return (gx if ctx.needs_input_grad[0] else None), gs, None, None, None, None


def lsq_fake_quant(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
                   factor: float, axis: int | None = None, keep: torch.Tensor | None = None) -> torch.Tensor:
    """``fake_quant`` with the step's gradient scaled by ``factor``; where ``keep`` is true, ``x`` itself."""
    if axis is None:
        z = float(zero_point)
        lo, hi = qmin - z, qmax - z
        if native.library() is not None and native.usable(x, keep):
            return _NativeLSQFakeQuant.apply(x, scale, lo, hi, factor, keep)
    else:
        z = bcast(zero_point, x, axis)
        lo, hi = qmin - z, qmax - z
    return _LSQFakeQuant.apply(x, scale, lo, hi, factor, axis, keep)


class LSQQuantizer(UniformQuantizer, Trainable):
    """A fake quantizer trained with the LSQ step-size gradient; zero point fixed.

    Modes and QDrop (``drop_prob``) behave as in UniformQuantizer; in mode ``"quant"`` the value equals
    ``fake_quant`` bit for bit, only the step's gradient differs.
    """

    @classmethod
    def from_quantizer(cls, q: UniformQuantizer, tensor: torch.Tensor | None = None) -> LSQQuantizer:
        """An LSQ quantizer with ``q``'s spec, step and zero point; the step is made trainable."""
        channels = q.scale.numel() if q.spec.axis is not None else None
        new = cls(q.spec, channels)
        with torch.no_grad():
            new.scale.data = q.scale.detach().clone()
            new.zero_point.data = q.zero_point.detach().clone()
        new.to(q.scale.device)
        new.scale.requires_grad_(True)
        new.mode = q.mode
        return new

    def begin_training(self, recon) -> list[ParamGroup]:  # noqa: ANN001 - ReconConfig
        """The step at ``recon.act_lr()``, cosine-decayed."""
        self.scale.requires_grad_(True)
        return [ParamGroup("lsq.scale", [self.scale], recon.act_lr(), decay=True)]

    def after_step(self) -> None:
        self.scale.data.clamp_(min=1e-8)  # keep the step positive

    def harden(self) -> None:
        self.scale.requires_grad_(False)

    def grad_factor(self, x: torch.Tensor) -> float:
        """``g = 1 / sqrt(n * (qmax - qmin))`` with ``n`` the elements per step size."""
        n = x.numel() if self.spec.axis is None else x.numel() // max(x.shape[self.spec.axis], 1)
        return 1.0 / math.sqrt(max(n, 1) * (self.qmax - self.qmin))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode != "quant":
            return super().forward(x)
        keep = self.keep_mask(x)
        return lsq_fake_quant(x, self.scale, self.zero_point, self.qmin, self.qmax, self.grad_factor(x),
                              self.spec.axis, keep)


def grad_scale(x: torch.Tensor, g: float) -> torch.Tensor:
    """``x`` in value, with its gradient multiplied by ``g`` (``x * g - (x * g).detach()`` is exactly 0)."""
    xg = x * g
    return x.detach() + (xg - xg.detach())


def grad_scale_reference(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
                         factor: float, axis: int | None = None) -> torch.Tensor:
    """LSQ written with autograd's own ops (straight-through round, clamp): the fused function's reference."""
    s = bcast(grad_scale(scale, factor), x, axis)
    z = bcast(zero_point, x, axis)
    return (torch.clamp(round_ste(x / s) + z, qmin, qmax) - z) * s
