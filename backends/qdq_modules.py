"""qdq_modules: the deployed forms of quantizers, as modules the ONNX exporter translates.

``qc::qdq`` (quantize, clamp to integer bounds, dequantize) and ``qc::dequantize`` are custom ops
whose ONNX translations (:data:`TRANSLATIONS`) are ``QuantizeLinear -> [Clip] -> DequantizeLinear``
and ``DequantizeLinear``; the modules below call them (or, for float-simulation targets, compute
the same values with float operations). GELU gets a translation of its own, in the form ONNX
Runtime fuses.
"""

from __future__ import annotations

import torch
from onnxscript import opset18 as op
from torch import nn


@torch.library.custom_op("qc::qdq", mutates_args=())
def qdq(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Per-tensor quantize (to zero_point's dtype), clamp to [lo, hi], dequantize."""
    z = zero_point.to(torch.float32)
    q = torch.clamp(torch.round(x / scale) + z, lo, hi)
    return (q - z) * scale


@qdq.register_fake
def _(x, scale, zero_point, lo, hi):  # noqa: ANN001, ANN202
    return torch.empty_like(x)


@torch.library.custom_op("qc::dequantize", mutates_args=())
def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int) -> torch.Tensor:
    """Dequantize stored integers, per channel along ``axis`` when ``scale`` is a vector."""
    shape = [1] * q.dim()
    if scale.dim() == 1 and q.dim() > 0:
        shape[axis] = -1
    return (q.to(torch.float32) - zero_point.to(torch.float32).reshape(shape if scale.dim() else [])) * \
        scale.reshape(shape if scale.dim() else [])


@dequantize.register_fake
def _(q, scale, zero_point, axis):  # noqa: ANN001, ANN202
    return torch.empty(q.shape, dtype=torch.float32)


def _qdq_onnx(x, scale, zero_point, lo: int, hi: int):  # noqa: ANN001, ANN202
    q = op.QuantizeLinear(x, scale, zero_point)
    if (lo, hi) not in ((0, 255), (-128, 127)):
        q = op.Clip(q, op.CastLike(op.Constant(value_int=lo), zero_point),
                    op.CastLike(op.Constant(value_int=hi), zero_point))
    return op.DequantizeLinear(q, scale, zero_point)


def _dequantize_onnx(q, scale, zero_point, axis: int):  # noqa: ANN001, ANN202
    return op.DequantizeLinear(q, scale, zero_point, axis=axis)


def _gelu_onnx(x, approximate: str = "none"):  # noqa: ANN001, ANN202
    """GELU as ``(x * 0.5) * (1 + erf(x / sqrt 2))``, the operand order ONNX Runtime fuses into one
    Gelu kernel (with the bias Add before it: BiasGelu); the exporter's ``0.5 * (1 + erf) * x``
    stays five element-wise kernels. The tanh approximation as its formula."""
    half = op.Mul(x, op.CastLike(op.Constant(value_float=0.5), x))
    one = op.CastLike(op.Constant(value_float=1.0), x)
    if approximate == "tanh":
        cube = op.Mul(op.Mul(x, x), x)
        inner = op.Add(x, op.Mul(op.CastLike(op.Constant(value_float=0.044715), x), cube))
        return op.Mul(half, op.Add(one, op.Tanh(op.Mul(op.CastLike(op.Constant(value_float=0.7978845608028654), x),
                                                       inner))))
    return op.Mul(half, op.Add(op.Erf(op.Div(x, op.CastLike(op.Constant(value_float=1.4142135623730951), x))), one))


TRANSLATIONS = {torch.ops.qc.qdq.default: _qdq_onnx, torch.ops.qc.dequantize.default: _dequantize_onnx,
                torch.ops.aten.gelu.default: _gelu_onnx}


class QdqActivation(nn.Module):
    """Deployed activation quantizer: Q -> Clip(lo, hi) -> DQ with a uint8/int8 zero point."""

    def __init__(self, scale: torch.Tensor, zero_point: torch.Tensor, lo: int, hi: int, signed: bool) -> None:
        super().__init__()
        self.register_buffer("scale", scale.detach().clone().float().reshape(()))
        self.register_buffer("zero_point", zero_point.detach().round().to(torch.int8 if signed else torch.uint8)
                             .reshape(()))
        self.lo, self.hi = int(lo), int(hi)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.qc.qdq(x, self.scale, self.zero_point, self.lo, self.hi)


class FloatFakeQuant(nn.Module):
    """Deployed activation quantizer of a float-simulation target: ``(clip(round(x / s) + z, lo, hi) - z) * s``
    in float operations (Div, Round, Add, Clip, Sub, Mul), which no runtime fuses into integer kernels."""

    def __init__(self, scale: torch.Tensor, zero_point: torch.Tensor, lo: int, hi: int, signed: bool) -> None:
        super().__init__()
        self.register_buffer("scale", scale.detach().clone().float().reshape(()))
        self.register_buffer("zero_point", zero_point.detach().clone().float().reshape(()))
        self.lo, self.hi = float(lo), float(hi)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = torch.clamp(torch.round(x / self.scale) + self.zero_point, self.lo, self.hi)
        return (q - self.zero_point) * self.scale


class QdqConstant(nn.Module):
    """Deployed constant: stored integers and their scale/zero point, dequantized at run time."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int) -> None:
        super().__init__()
        self.register_buffer("q", q)
        self.register_buffer("scale", scale.detach().clone().float())
        self.register_buffer("zero_point", zero_point.detach().round().to(q.dtype))
        self.axis = axis

    def forward(self) -> torch.Tensor:
        return torch.ops.qc.dequantize(self.q, self.scale, self.zero_point, self.axis)


class FloatConstant(nn.Module):
    """Deployed constant in float: a parameter's fake-quantized values."""

    def __init__(self, value: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("value", value.detach().clone().float())

    def forward(self) -> torch.Tensor:
        return self.value
