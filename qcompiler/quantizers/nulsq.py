"""nuLSQ: an activation quantizer with one learned step per quantization level (non-uniform LSQ).

Rule: a calibrated uniform grid of ``n = qmax - qmin`` intervals becomes ``n`` positive steps
``d_0 .. d_{n-1}`` (interval ``m`` runs from level ``m`` to level ``m + 1``), all starting at the
uniform step ``s``. The levels keep zero where the uniform grid had it (level index ``z - qmin``,
``z`` the calibrated zero point): ``L_k = sum_{m < k} d_m - sum_{m < z - qmin} d_m``, ``k = 0..n``.
An input ``x`` in interval ``m`` (``L_m < x <= L_{m+1}``; the first and last intervals extend
beyond the range) becomes

    x_hat = L_m + d_m * round(clamp(u, 0, 1)),        u = (x - L_m) / d_m

(the nearer level; a tie goes to the lower one). Its straight-through gradients, where "beyond
the range" means more than half an end step past ``L_0`` or ``L_n`` (as LSQ clamps the rounded
value): ``d x_hat / d x`` is 0 beyond the range and 1 elsewhere; ``d x_hat / d d_m`` is
``round(u) - u`` for the ``x`` of interval ``m`` (LSQ's term, in the interval's own units), 1
for every step above zero and -1 for every step below zero when ``x`` is beyond the top or the
bottom of the range (the end level moves with them), 0 elsewhere (inside another interval, the
surrogate ``x + d_m (round(u) - u)`` does not depend on ``d_j``, ``j != m``). With equal steps that
is LSQ's gradient split by interval, and LSQ's ``1 / sqrt(N (qmax - qmin))`` scale is applied.

The paper trains the steps with quantization-aware training; here reconstruction learns them, at
the activation rate (``recon.act_lr()``, cosine) with QDrop's mixing like LSQ. Levels that are not
a uniform grid have no integer form (``integer_form = False``): the fake-quant model and onnx-fp
(``float_module``: a Gather of the level table at the count of midpoints below ``x``) run them.

Training runs one autograd node; for float32 CPU tensors a C kernel (``native``, ``csrc/nulsq.c``)
makes one pass each way with QDrop's mask folded in, the same values as the torch composition
(``torch.bucketize`` and gathers, a dozen passes), which made reconstruction many times slower than LSQ.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from qcompiler.quantizers import native
from qcompiler.quantizers.family import ParamGroup, Trainable
from qcompiler.quantizers.qdrop import mix
from qcompiler.quantizers.uniform import UniformQuantizer


def levels_of(steps: torch.Tensor, zero: int) -> torch.Tensor:
    """The ``n + 1`` levels of ``n`` steps, level index ``zero`` at 0."""
    cum = torch.cat([steps.new_zeros(1), torch.cumsum(steps, 0)])
    return cum - cum[zero]


def range_ends(levels: torch.Tensor) -> tuple[float, float]:
    """Where "beyond the range" starts: half an end step below the first level and above the last."""
    first, last = levels[1] - levels[0], levels[-1] - levels[-2]
    return float(levels[0] - first / 2), float(levels[-1] + last / 2)


class _NonUniform(torch.autograd.Function):
    """The nuLSQ rule and its gradients (module docstring) as one autograd node."""

    @staticmethod
    def forward(ctx, x, steps, zero, factor):
        levels = levels_of(steps, zero)
        n = steps.numel()
        m = torch.bucketize(x.contiguous(), levels[1:n]).clamp_(max=n - 1)  # L_m < x <= L_{m+1}
        lower, d = levels[m], steps[m]
        u = (x - lower) / d
        r = torch.round(u.clamp(0.0, 1.0))
        ctx.save_for_backward(x, m, u, r, levels)
        ctx.zero, ctx.factor = zero, factor
        return levels[m + r.to(torch.int64)]  # the table's entry itself, as the deployed Gather reads it

    @staticmethod
    def backward(ctx, g):
        x, m, u, r, levels = ctx.saved_tensors
        n = levels.numel() - 1
        # beyond the range: more than half a step past an end level (LSQ's clamp of the rounded value)
        lo, hi = range_ends(levels)
        below, above = x < lo, x > hi
        inside = ~(below | above)
        gx = g * inside if ctx.needs_input_grad[0] else None
        gs = None
        if ctx.needs_input_grad[1]:
            gs = torch.zeros(n, dtype=g.dtype).index_add_(0, m[inside], (g * (r - u))[inside])
            side = torch.arange(n) >= ctx.zero  # steps above zero
            gs = gs + torch.where(side, g[above].sum(), -g[below].sum())
            gs = gs * ctx.factor
        return gx, gs, None, None


class _NativeNonUniform(torch.autograd.Function):
    """``mix(x, _NonUniform(x), keep)`` in one C pass each way (``native.nulsq_forward/backward``)."""

    @staticmethod
    def forward(ctx, x, steps, zero, factor, keep):
        levels = levels_of(steps.detach(), zero)
        lo, hi = range_ends(levels)
        out, code = native.nulsq_forward(x, keep, levels, steps, lo, hi)
        ctx.save_for_backward(x, code, levels, steps.detach())
        ctx.zero, ctx.factor, ctx.lo = zero, factor, lo
        return out

    @staticmethod
    def backward(ctx, g):
        x, code, levels, steps = ctx.saved_tensors
        gx, sums = native.nulsq_backward(g, x, code, levels, steps, ctx.lo)
        gs = None
        if ctx.needs_input_grad[1]:
            n = steps.numel()
            ends = torch.where(torch.arange(n) >= ctx.zero, sums[n + 1], -sums[n])  # steps above / below zero
            gs = ((sums[:n] + ends) * ctx.factor).to(steps.dtype)
        return (gx if ctx.needs_input_grad[0] else None), gs, None, None, None


class FloatLevels(nn.Module):
    """The deployed float form of a table of ``2^b`` levels: ``levels[i]`` with ``i`` the number of
    midpoints below ``x``, found by a branchless binary search (``b`` rounds of Gather, Greater and
    Where; memory of a few copies of ``x``, not one per level)."""

    def __init__(self, levels: torch.Tensor) -> None:
        super().__init__()
        self.bits = (levels.numel() - 1).bit_length()
        if levels.numel() != 1 << self.bits:
            raise ValueError(f"a level table of {levels.numel()} entries is not 2^bits")
        self.register_buffer("levels", levels.detach().clone().float())
        self.register_buffer("mids", (self.levels[:-1] + self.levels[1:]) / 2)

    @staticmethod
    def _take(table: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return table.index_select(0, idx.reshape(-1)).reshape(idx.shape)  # one Gather

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idx = torch.zeros(x.shape, dtype=torch.int64)
        for k in range(self.bits - 1, -1, -1):  # invariant: mids[idx - 1] < x, as far as known
            cand = idx + (1 << k)
            idx = torch.where(x > self._take(self.mids, cand - 1), cand, idx)
        return self._take(self.levels, idx)


class NuLSQQuantizer(UniformQuantizer, Trainable):
    """Per-tensor activation quantizer with one learned step per level (module docstring). Modes and
    QDrop as in UniformQuantizer; ``scale`` and ``zero_point`` keep the uniform grid it started from."""

    integer_form = False

    def __init__(self, spec, channels: int | None = None) -> None:  # noqa: ANN001 - QSpec
        super().__init__(spec, channels)
        if spec.axis is not None:
            raise ValueError("nuLSQ learns per-tensor activation grids")
        self.steps = nn.Parameter(torch.ones(spec.qmax - spec.qmin), requires_grad=False)

    @classmethod
    def from_quantizer(cls, q: UniformQuantizer, tensor: torch.Tensor | None = None) -> NuLSQQuantizer:
        """Steps all equal to ``q``'s step, levels placed as ``q``'s grid."""
        if tensor is not None:
            raise ValueError("nuLSQ quantizes activations")
        new = cls(q.spec)
        with torch.no_grad():
            new.scale.data = q.scale.detach().clone()
            new.zero_point.data = q.zero_point.detach().clone()
            new.reset_steps()
        new.mode = q.mode
        return new.to(q.scale.device)

    @torch.no_grad()
    def reset_steps(self) -> None:
        """Every step equal to the uniform grid's."""
        self.steps.data = torch.full_like(self.steps, float(self.scale))

    def set_range(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        super().set_range(lo, hi)
        self.reset_steps()

    def zero_index(self) -> int:
        return int(round(float(self.zero_point))) - self.qmin

    def levels(self) -> torch.Tensor:
        """The ``qmax - qmin + 1`` levels."""
        return levels_of(self.steps.detach(), self.zero_index())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode != "quant":
            return super().forward(x)
        factor = 1.0 / math.sqrt(max(x.numel(), 1) * (self.qmax - self.qmin))
        keep = self.keep_mask(x)
        if native.library() is not None and native.usable(x, keep):
            return _NativeNonUniform.apply(x, self.steps, self.zero_index(), factor, keep)
        out = _NonUniform.apply(x, self.steps, self.zero_index(), factor)
        return out if keep is None else mix(x, out, keep)

    def float_module(self) -> nn.Module:
        """The float operations that compute this quantizer's values in a deployed graph."""
        return FloatLevels(self.levels())

    # -- the trainer's protocol (family.Trainable)

    def begin_training(self, recon) -> list[ParamGroup]:  # noqa: ANN001 - ReconConfig
        """The steps at ``recon.act_lr()``, cosine-decayed (LSQ's schedule)."""
        self.steps.requires_grad_(True)
        return [ParamGroup("nulsq.steps", [self.steps], recon.act_lr(), decay=True)]

    @torch.no_grad()
    def after_step(self) -> None:
        self.steps.clamp_(min=1e-3 * float(self.scale))  # positive: no level passes its neighbour

    def harden(self) -> None:
        self.steps.requires_grad_(False)
