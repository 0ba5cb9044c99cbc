"""AdaRound: learn, per weight, whether it rounds up or down (Nagel et al. 2020, "Up or Down?").

Rule: with per-channel step ``s`` and zero point ``z`` (broadcast on the spec's axis) and one
learnable ``alpha`` (``V`` in the paper) per weight,

    h(V)   = clamp(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)      zeta = 1.1, gamma = -0.1
    soft   = (clamp(floor(w / s) + h(V) + z, qmin, qmax) - z) * s       (while training)
    q      = clamp(floor(w / s) + [V >= 0] + z, qmin, qmax)             (hardened integers)
    hard   = (q - z) * s

``V >= 0`` is the same as ``h(V) >= 0.5``. ``alpha`` starts so that ``h(V)`` equals the fractional
part ``w / s - floor(w / s)`` (clamped to ``[EPS, 1 - EPS]`` so it stays where h has a gradient),
with its sign taken from round-half-to-even: at initialisation the hardened weight is exactly
``UniformQuantizer``'s round-to-nearest, ties included. The regulariser
``sum(1 - |2 h(V) - 1| ** beta)`` pushes every h to 0 or 1 as ``beta`` is annealed
(``BetaSchedule``). ``int_repr`` always stores the hard decision, and the hard forward is computed
from those same integers, so the fake-quant model and the lowered ONNX weights agree bit for bit.
On a midrise grid (no zero level, see ``uniform``) the levels sit at ``(q + 1/2) * s``, so
``w / s - 1/2`` takes the place of ``w / s`` throughout; on a centered grid whose zero point
``z = zi + o`` is a half-integer, ``w / s + o`` does, with ``zi`` in place of ``z`` inside the
clamp. The integers are placed with the calibrated step (``grid_scale``, fixed); the step they are
read with (``scale``) starts equal and the trainer may learn it (``w_step_lr``), which rescales
each channel's quantized weights.
"""

from __future__ import annotations

import torch
from torch import nn

from qcompiler.quantizers.family import ParamGroup, Trainable, on_weight_grid
from qcompiler.quantizers.grid import QSpec, bcast, split_zero_point
from qcompiler.quantizers.uniform import UniformQuantizer

ZETA = 1.1
GAMMA = -0.1
EPS = 1e-4  # the initial fraction is kept in [EPS, 1 - EPS] before the logit


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    """``h(V) = clamp(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)``: reaches exactly 0 and 1."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


class _SoftRound(torch.autograd.Function):
    """The soft weight ``(clamp(base + h(alpha), qmin, qmax) + offset) * s`` and, when ``beta`` is
    given, the regulariser ``sum(1 - |2 h(alpha) - 1| ** beta)``, as one autograd node.

    The same values as composing ``rectified_sigmoid``, ``clamp`` and ``regularizer`` from autograd's
    ops, bit for bit, and the same gradients up to the order of products. Composed, each of those
    small operations (and its backward) cost a dispatch on a weight of a few thousand elements, and
    h was computed twice.
    """

    @staticmethod
    def forward(ctx, alpha, base, s, offset, qmin, qmax, beta):
        sig = torch.sigmoid(alpha)
        hu = sig * (ZETA - GAMMA) + GAMMA
        h = torch.clamp(hu, 0.0, 1.0)
        t = base + h
        level = torch.clamp(t, qmin, qmax) + offset
        w = level * s
        pass_h = (hu >= 0.0) & (hu <= 1.0)  # where clamp's gradient passes, bounds included (as torch's)
        pass_t = (t >= qmin) & (t <= qmax)
        reg, d = None, None
        if beta is not None:
            d = (2.0 * h - 1.0).abs()
            reg = (1.0 - d.pow(beta)).sum()
        ctx.save_for_backward(sig, pass_h, pass_t, level, s, h, d)
        ctx.beta = beta
        return w, reg

    @staticmethod
    def backward(ctx, gw, greg):
        sig, pass_h, pass_t, level, s, h, d = ctx.saved_tensors
        gh = gw * s * pass_t
        if greg is not None and ctx.beta is not None:
            # d/dh (1 - |2h - 1| ** beta) = -2 beta |2h - 1| ** (beta - 1) sign(2h - 1)
            gh = gh - greg * (2.0 * ctx.beta) * d.pow(ctx.beta - 1.0) * torch.sign(2.0 * h - 1.0)
        galpha = gh * pass_h * (ZETA - GAMMA) * (sig * (1.0 - sig))
        gs = None
        if ctx.needs_input_grad[2]:  # a trained weight step (``w_step_lr``): summed to s's shape
            gs = gw * level
            if s.dim() == 0:
                gs = gs.sum()
            else:
                dims = [k for k in range(gs.dim()) if s.shape[k] == 1 < gs.shape[k]]
                gs = gs.sum(dims, keepdim=True) if dims else gs
        return galpha, None, gs, None, None, None, None


def inverse_rectified_sigmoid(h: torch.Tensor) -> torch.Tensor:
    """A ``V`` with ``h(V) = h`` for ``h`` in (0, 1); ``h`` is first clamped to ``[EPS, 1 - EPS]``."""
    h = torch.clamp(h, EPS, 1.0 - EPS)
    return torch.logit((h - GAMMA) / (ZETA - GAMMA))


class AdaRoundQuantizer(UniformQuantizer, Trainable):
    """A weight quantizer whose rounding (up or down, per weight) is learned through ``alpha``.

    The grid (``spec``, ``scale``, ``zero_point``) is the one of the UniformQuantizer it replaces and
    is not trained here. ``soft`` selects the forward in mode ``"quant"``: the soft weight (True,
    while reconstructing) or the hardened one (False). A new quantizer starts hard, which at
    initialisation is round-to-nearest; the trainer sets ``soft = True`` (and leaves the weight and grid
    alone: the soft forward caches ``floor(w / s)``) and ``harden()`` sets it
    back. ``soft`` is a plain attribute, not saved in the state dict: a loaded quantizer is hard.
    Modes ``"off"`` and ``"observe"`` behave as in UniformQuantizer.
    """

    def __init__(self, spec: QSpec, channels: int | None = None, weight_shape: tuple[int, ...] = ()) -> None:
        super().__init__(spec, channels)
        self.alpha = nn.Parameter(torch.zeros(weight_shape), requires_grad=False)
        # The step that places the integer grid (floor(w / grid_scale)); ``scale``, the step the
        # integers are read with, starts equal and may be trained (``w_step_lr``).
        self.register_buffer("grid_scale", torch.ones_like(self.scale.data))
        self.soft = False
        self._base: tuple[torch.Tensor, torch.Tensor | float] | None = None  # (floor(w / s) + zi, offset), while soft
        # While soft: with ``reg_beta`` set, each forward also leaves ``regularizer(reg_beta)`` of the
        # same h in ``reg`` (one autograd node computes both; the trainer adds it to its loss).
        self.reg_beta: float | None = None
        self.reg: torch.Tensor | None = None
        self._beta: BetaSchedule | None = None
        self._learn_step = False

    @classmethod
    def from_quantizer(cls, q: UniformQuantizer, w: torch.Tensor | None = None) -> AdaRoundQuantizer:
        """An AdaRound quantizer on ``q``'s grid whose hardened rounding of ``w`` is round-to-nearest."""
        new = on_weight_grid(cls, q, w, "AdaRound learns the rounding of a weight")
        new.init_alpha(w)
        return new

    @torch.no_grad()
    def init_alpha(self, w: torch.Tensor) -> None:
        """Set ``alpha`` so that ``h(alpha)`` is the fraction of ``w / s`` and its sign is round-to-nearest.

        Rounds up (``alpha >= 0``) exactly where ``round(w / s) > floor(w / s)`` (half to even, as
        ``fake_quant``); elsewhere ``alpha`` is made strictly negative.
        """
        w = w.detach().to(self.scale.dtype)
        ws = w / bcast(self.grid_scale, w, self.spec.axis)
        pos = ws - 0.5 if self.spec.midrise else ws + self._split(w)[1]  # where w sits between two grid levels
        floor = torch.floor(pos)
        v = inverse_rectified_sigmoid(pos - floor)
        nearest = torch.floor(ws) if self.spec.midrise else torch.round(pos)  # UniformQuantizer's choice
        up = nearest > floor
        tiny = torch.finfo(v.dtype).tiny
        v = torch.where(up, v.clamp(min=0.0), v.clamp(max=-tiny))
        self.alpha.data = v.reshape(w.shape).clone()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, soft={self.soft}"

    def _split(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | float]:
        """``(zi, o)`` broadcast on ``w``: the zero point's integer part and, on a centered grid, its
        fractional part ``o`` (levels sit where ``w / s + o`` is an integer; 0 on other grids)."""
        zi, o = split_zero_point(bcast(self.zero_point, w, self.spec.axis))
        return zi, (o if self.spec.centered else 0.0)

    def _grid(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(floor(w / s + o), zi)``: the grid integer below ``w`` before the zero point's integer part."""
        if w.shape != self.alpha.shape:
            raise ValueError(f"AdaRound alpha has shape {tuple(self.alpha.shape)}, weight {tuple(w.shape)}")
        zi, o = self._split(w)
        g = bcast(self.grid_scale, w, self.spec.axis)
        return torch.floor(w / g - 0.5) if self.spec.midrise else torch.floor(w / g + o), zi

    def _hard_int(self, w: torch.Tensor) -> torch.Tensor:
        """``clamp(floor(w / s + o) + [alpha >= 0] + zi, qmin, qmax)``: the learned integers."""
        floor, zi = self._grid(w)
        up = (self.alpha >= 0).to(floor.dtype)
        return torch.clamp(floor + up + zi, self.qmin, self.qmax)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.mode != "quant":
            return super().forward(w)
        if self.soft:
            # The weight, its grid and the zero point do not change while the rounding is learned:
            # floor once. ``level_values``' ``(q - z) * s`` or ``(q + 1/2) * s`` is ``(q + offset) * s``.
            if self._base is None or self._base[0].shape != w.shape:
                floor, zi = self._grid(w)
                offset = 0.5 if self.spec.midrise else -bcast(self.zero_point, w, self.spec.axis).detach()
                self._base = ((floor + zi).detach(), offset)
            base, offset = self._base
            s = bcast(self.scale, w, self.spec.axis)
            out, self.reg = _SoftRound.apply(self.alpha, base, s, offset, float(self.qmin), float(self.qmax),
                                             self.reg_beta)
            return out
        return self.level_values(self._hard_int(w), w)

    def penalty(self, beta: float) -> torch.Tensor:
        """``sum(1 - |2 h(alpha) - 1| ** beta)``: 0 when every h is 0 or 1, ``numel`` when all are 0.5."""
        h = rectified_sigmoid(self.alpha)
        return (1.0 - (2.0 * h - 1.0).abs().pow(beta)).sum()

    # -- the trainer's protocol (family.Trainable)

    def begin_training(self, recon) -> list[ParamGroup]:  # noqa: ANN001 - ReconConfig
        """Soft rounding; ``alpha`` at ``recon.weight_lr()`` (cosine-decayed with ``recon.w_lr_decay``);
        with ``recon.w_step_lr`` also the step, relative to its mean and cosine-decayed; the
        regulariser on ``BetaSchedule``."""
        self.soft = True
        self.alpha.requires_grad_(True)
        self._beta = BetaSchedule(recon.iters, warmup=0.2) if recon.iters else None
        groups = [ParamGroup("adaround.alpha", [self.alpha], recon.weight_lr(), decay=recon.w_lr_decay)]
        self._learn_step = recon.w_step_lr > 0
        if self._learn_step:
            self.scale.requires_grad_(True)
            groups.append(ParamGroup(f"adaround.step.{id(self)}", [self.scale],
                                     recon.w_step_lr * float(self.scale.detach().abs().mean()), decay=True))
        return groups

    def before_step(self, it: int) -> None:
        beta, on = self._beta(it)
        self.reg_beta = beta if on else None  # the forward then leaves the penalty in self.reg

    def regularizer(self) -> torch.Tensor | None:
        return self.reg if self.reg_beta is not None else None

    def after_step(self) -> None:
        if self._learn_step:
            self.scale.data.clamp_(min=1e-8)

    @torch.no_grad()
    def convergence(self) -> tuple[int, int]:
        """(roundings whose h is still strictly between 0.1 and 0.9, all roundings)."""
        h = rectified_sigmoid(self.alpha)
        return int(((h > 0.1) & (h < 0.9)).sum()), h.numel()

    def harden(self) -> None:
        """Switch the forward to the hard rounding ``floor(w / s) + [alpha >= 0]``."""
        self.soft = False
        self._base = None
        self.reg_beta = None
        self.reg = None
        self.alpha.requires_grad_(False)
        self.scale.requires_grad_(False)

    @torch.no_grad()
    def int_repr(self, x: torch.Tensor) -> torch.Tensor:
        """The integers stored for ``x``: always the hard decision, whatever ``soft`` is.

        The hard forward is ``(int_repr(x) - z) * s``, computed from the same tensor, so it equals the
        deployed DequantizeLinear of these integers bit for bit (midrise: ``2q + 1`` at ``s / 2``,
        and ``(2q + 1) * (s / 2)`` is ``(q + 1/2) * s`` exactly; centered: ``q - z`` at ``s``).
        """
        w = x.detach().to(self.scale.dtype)
        return self.level_store(self._hard_int(w), w)


class BetaSchedule:
    """The regulariser's exponent ``beta`` over ``iters`` iterations: warm-up, then linear decay.

    Iterations ``it < int(warmup * iters)`` are the warm-up: the regulariser is off (its weight is 0)
    and ``beta`` reports ``start``. From the first post-warm-up iteration, where it is ``start``,
    ``beta`` falls linearly to ``end``, reached on the last iteration ``iters - 1`` (and kept after).
    Linear, like BRECQ/QDrop's decay, but ending exactly on ``end`` at the last iteration.
    """

    def __init__(self, iters: int, warmup: float = 0.2, start: float = 20.0, end: float = 2.0) -> None:
        if iters < 1:
            raise ValueError(f"iters must be at least 1, got {iters}")
        if not 0.0 <= warmup < 1.0:
            raise ValueError(f"warmup must be in [0, 1), got {warmup}")
        self.iters = iters
        self.warm = int(warmup * iters)
        self.start = start
        self.end = end

    def __call__(self, it: int) -> tuple[float, bool]:
        """``(beta, regulariser on)`` at iteration ``it`` (counted from 0)."""
        if it < self.warm:
            return self.start, False
        span = max(self.iters - 1 - self.warm, 1)
        rel = min((it - self.warm) / span, 1.0)
        return self.end + (self.start - self.end) * (1.0 - rel), True
