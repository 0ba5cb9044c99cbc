"""Bias quantization: the int32 accumulator grid of integer conv/matmul kernels.

Rule: a bias is stored as ``clamp(round(b / (s_in * s_w)), -INT32_LIMIT, INT32_LIMIT)`` at step
``s_in * s_w``, the grid the kernel's int32 accumulator adds it on; the fake-quant model rounds it
the same way.
"""

from __future__ import annotations

import torch
from torch import nn

from qcompiler.quantizers.uniform import UniformQuantizer

#: The largest magnitude a stored bias takes: int32, kept to a float32-exact value (2**31 - 1 is not
#: one; it rounds to 2**31, which overflows the conversion to int32).
INT32_LIMIT = 2**31 - 128
#: The largest bias, in accumulator steps, that calibration lets a channel start with (``Calibrate``
#: widens the weight step of a channel whose bias would exceed it): far inside int32, so the sum of
#: products still fits, and an activation step that LSQ later shrinks up to 128-fold keeps it in range.
BIAS_HEADROOM = 2**24


class _BiasFakeQuant(torch.autograd.Function):
    """``clamp(round(b / s), -INT32_LIMIT, INT32_LIMIT) * s`` with ``s = s_act * s_w``, straight-through
    round, as one autograd node: the values of the composition with ``round_ste`` bit for bit, its
    gradients up to the order of products, in fewer operations (a bias is a few dozen numbers:
    dispatching each operation costs more than computing it).
    """

    @staticmethod
    def forward(ctx, b, s_act, s_w):
        s = s_act * s_w
        v = b / s
        r = torch.round(v)
        q = torch.clamp(r, -INT32_LIMIT, INT32_LIMIT)
        ctx.save_for_backward(v, q, q == r, s_act, s_w)
        return q * s

    @staticmethod
    def backward(ctx, g):
        v, q, inside, s_act, s_w = ctx.saved_tensors
        gb = g * inside if ctx.needs_input_grad[0] else None
        if not (ctx.needs_input_grad[1] or ctx.needs_input_grad[2]):
            return gb, None, None
        gs = g * (q - v * inside)  # d out / d s: q - v inside the range, q where clamped
        g_act = (gs * s_w).sum().reshape(s_act.shape) if ctx.needs_input_grad[1] else None
        g_w = None
        if ctx.needs_input_grad[2]:
            g_w = gs * s_act
            g_w = g_w.sum() if s_w.dim() == 0 else g_w
        return gb, g_act, g_w


class BiasQuantizer(nn.Module):
    """Fake-quantizes a bias the way integer kernels store it: int32 with scale ``s_in * s_w``.

    Integer conv/matmul kernels add the bias to the int32 accumulator, so the bias is rounded to
    the accumulator's grid. Modelling that rounding keeps the fake-quant model bit-faithful to the
    deployed one (without it, rounding ties flip and 4-bit models drift apart). The two quantizers
    are referenced, not owned: they stay registered where they are.

    ``shift`` (per channel, zero until reconstruction's bias correction sets it) is added to the
    bias of the quantized layer only: with the quantizers off the layer keeps its float bias.
    """

    def __init__(self, act: UniformQuantizer, weight: UniformQuantizer, channels: int | None = None) -> None:
        super().__init__()
        self.refs = (act, weight)  # a tuple is not registered as submodules
        self.register_buffer("shift", torch.zeros(() if channels is None else (channels,)))

    def step(self) -> torch.Tensor:
        act, weight = self.refs
        return act.scale.reshape(()) * weight.stored_scale()

    def forward(self, b: torch.Tensor) -> torch.Tensor:
        act, weight = self.refs
        if act.mode != "quant" or weight.mode != "quant":
            return b
        return _BiasFakeQuant.apply(b + self.shift, act.scale.reshape(()), weight.stored_scale())  # as stored

    def headroom_step(self, b: torch.Tensor) -> torch.Tensor:
        """Per output channel, the smallest stored weight step at which ``b`` is at most
        ``BIAS_HEADROOM`` accumulator steps (with the activation's current step)."""
        act, _ = self.refs
        return (b.detach() + self.shift).abs() / (act.scale.detach().reshape(()) * BIAS_HEADROOM)

    @torch.no_grad()
    def fit_weight_step(self, b: torch.Tensor) -> int:
        """Widen the weight step of the output channels whose bias ``b`` would not fit the accumulator.

        A channel whose weights are all but zero (a "dead" channel after BatchNorm folding) gets a
        tiny ``s_w`` from its weights, and a bias of a few units is then billions of accumulator
        steps: stored as int32 it would be clamped to another value. Such a channel's step is raised
        to ``headroom_step``; its weights round to zero either way. Returns the channels widened.
        """
        _, wq = self.refs
        need = self.headroom_step(b.float())
        floor = need * wq.store_factor() if wq.scale.dim() else need.max() * wq.store_factor()
        low = wq.scale < floor
        if bool(low.any()):
            wq.scale.data = torch.where(low, floor, wq.scale)
        return int(low.sum())

    @torch.no_grad()
    def int_repr(self, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(int32 values, per-channel scale) of the stored bias."""
        s = self.step().detach().float()
        s = s.expand(b.shape[0]).contiguous() if s.dim() == 0 else s
        return torch.clamp(torch.round((b + self.shift) / s), -INT32_LIMIT, INT32_LIMIT).to(torch.int32), s
