"""Mr.BiQ: binary-coded weights whose codes and scales reconstruction learns (Jeon et al., CVPR 2022).

Rule of the free form (``MrBiQQuantizer``, ``--method mrbiq``): with ``k`` = the layer's weight bits,
``k`` scales ``alpha_i > 0`` per output channel (per tensor with ``--per-tensor``) and ``k`` codes
per weight,

    w_hat = sum_i alpha_i * b_i,        b_i in {-1, +1}

Initialisation binary-codes the weight: greedily (``b_i = sign(r)``, ``alpha_i = mean |r|``,
``r -= alpha_i b_i``), then ``INIT_ROUNDS`` alternations of the codes (each weight's nearest of the
``2^k`` levels) and the scales (least squares for those codes). Training relaxes every code to
``c_i`` in ``[-1, 1]``, starting at ``b_i`` (so the start is the binary-coded weight), with the value
``sum_i alpha_i c_i``: the codes learn at ``recon.weight_lr()`` (constant) and are clipped back to
``[-1, 1]`` after each step; the scales learn at ``recon.w_step_lr`` times their mean (cosine decay)
and stay positive; the regulariser ``sum(1 - |c| ** beta)`` on AdaRound's ``BetaSchedule`` pushes
the codes to +-1. Hardening takes ``b = +1`` where ``c >= 0``, else -1. The levels are not a uniform
grid: no integer target holds them (``integer_form = False``).

Rule of the uniform form (``MrBiQUniformQuantizer``, ``--method mrbiq-uniform``): the scales tied as
``alpha_i = 2 alpha_{i+1}`` and an offset, i.e. the codes are the binary digits of a grid integer of
the calibrated uniform grid (spec, step ``s``, zero point ``z``):

    q     = qmin + sum_i 2^(k-i) (c_i + 1) / 2          (i = 1..k, most significant first)
    w_hat = (q - z) * s    (midrise grids: (q + 1/2) * s)

which is ``sum_i alpha_i c_i + offset`` with ``alpha_i = 2^(k-i) s / 2``. The codes start at the
digits of round-to-nearest (the start is exactly RTN); the step ``s`` learns like the free form's
scales (``alpha`` moves as one), the zero point stays so the grid stays deployable, and the stored
integers are the uniform grid's: it lowers to onnx-int8 like any uniform weight.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from qcompiler.quantizers.adaround import BetaSchedule
from qcompiler.quantizers.family import ParamGroup, Trainable, on_weight_grid
from qcompiler.quantizers.uniform import UniformQuantizer

INIT_ROUNDS = 10
UNDECIDED = 0.8  # a code with |c| below this is counted undecided (AdaRound's h in (0.1, 0.9))


def all_codes(k: int) -> torch.Tensor:
    """The ``2^k`` code vectors in {-1, +1}^k, one per row."""
    return torch.tensor(list(itertools.product((-1.0, 1.0), repeat=k)))


def nearest_codes(w2d: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """For rows ``w2d`` (C, N) and scales ``alpha`` (C, k): the codes (k, C, N) of each weight's
    nearest level ``sum_i alpha_i b_i`` (ties to the lower level)."""
    codes = all_codes(alpha.shape[1]).to(w2d)  # (L, k)
    levels = alpha @ codes.T  # (C, L)
    levels, order = levels.sort(dim=1)
    hi = torch.searchsorted(levels, w2d.contiguous()).clamp(1, levels.shape[1] - 1)
    lo = hi - 1
    pick = torch.where((w2d - levels.gather(1, lo)).abs() <= (levels.gather(1, hi) - w2d).abs(), lo, hi)
    return codes[order.gather(1, pick)].permute(2, 0, 1)


def binary_code(w2d: torch.Tensor, k: int, rounds: int = INIT_ROUNDS) -> tuple[torch.Tensor, torch.Tensor]:
    """``(alpha (C, k), codes (k, C, N))`` binary-coding the rows of ``w2d`` (module docstring)."""
    r = w2d.clone()
    alphas, codes = [], []
    for _ in range(k):
        b = torch.where(r >= 0, 1.0, -1.0)
        a = r.abs().mean(dim=1)
        r = r - a[:, None] * b
        alphas.append(a)
        codes.append(b)
    alpha, b = torch.stack(alphas, 1), torch.stack(codes)
    eye = torch.eye(k, dtype=w2d.dtype) * 1e-12
    for _ in range(rounds):
        b = nearest_codes(w2d, alpha)
        gram = torch.einsum("icn,jcn->cij", b, b) + eye
        alpha = torch.linalg.solve(gram, torch.einsum("icn,cn->ci", b, w2d))
        sign = torch.where(alpha < 0, -1.0, 1.0)  # a negative scale is a positive one with flipped codes
        alpha, b = alpha * sign, b * sign.T[:, :, None]
    return alpha.clamp(min=1e-12), nearest_codes(w2d, alpha.clamp(min=1e-12))


class _Codes(Trainable):
    """The learning both forms share: ``codes`` (k, *weight shape) in [-1, 1] at
    ``recon.weight_lr()``, constant (cosine-decayed with ``recon.w_lr_decay``), and the form's scales
    (``_scales()``: Mr.BiQ's ``alpha``, the uniform form's step) at ``recon.w_step_lr`` times their
    mean, cosine-decayed, kept positive."""

    codes: nn.Parameter

    def _scales(self) -> tuple[nn.Parameter, float]:
        """The scale parameter this form learns and the least value it may take."""
        raise NotImplementedError

    def _check_shape(self, w: torch.Tensor) -> None:
        if w.shape != self.codes.shape[1:]:
            raise ValueError(f"{type(self).__name__}: codes for a weight of shape {tuple(self.codes.shape[1:])}, "
                             f"got {tuple(w.shape)}")

    def begin_training(self, recon) -> list[ParamGroup]:  # noqa: ANN001 - ReconConfig
        """Codes at ``recon.weight_lr()`` (cosine-decayed with ``recon.w_lr_decay``), scales at
        ``recon.w_step_lr`` relative (none when 0)."""
        self.codes.requires_grad_(True)
        self._beta = BetaSchedule(recon.iters, warmup=0.2) if recon.iters else None
        self._reg_on = False
        groups = [ParamGroup("mrbiq.codes", [self.codes], recon.weight_lr(), decay=recon.w_lr_decay)]
        scale, _ = self._scales()
        if recon.w_step_lr > 0:
            scale.requires_grad_(True)
            groups.append(ParamGroup(f"mrbiq.scales.{id(self)}", [scale],
                                     recon.w_step_lr * float(scale.detach().abs().mean()), decay=True))
        return groups

    def before_step(self, it: int) -> None:
        self._reg_beta, self._reg_on = self._beta(it) if self._beta is not None else (None, False)

    def regularizer(self) -> torch.Tensor | None:
        if not getattr(self, "_reg_on", False):
            return None
        return (1.0 - self.codes.abs().pow(self._reg_beta)).sum()

    @torch.no_grad()
    def after_step(self) -> None:
        self.codes.clamp_(-1.0, 1.0)
        scale, floor = self._scales()
        scale.clamp_(min=floor)

    @torch.no_grad()
    def convergence(self) -> tuple[int, int]:
        """(codes with ``|c| < 0.8``, all codes)."""
        return int((self.codes.abs() < UNDECIDED).sum()), self.codes.numel()

    @torch.no_grad()
    def harden(self) -> None:
        """Codes to +-1; the learned scales stay."""
        self.codes.data = torch.where(self.codes >= 0, 1.0, -1.0).to(self.codes)
        self.codes.requires_grad_(False)
        self._scales()[0].requires_grad_(False)
        self._reg_on = False


class MrBiQQuantizer(nn.Module, _Codes):
    """Free binary-coding weights (module docstring). Modes as a uniform quantizer's: ``"quant"``
    computes the coded weight, ``"off"`` and ``"observe"`` pass the weight through."""

    integer_form = False  # its levels are no uniform grid

    def __init__(self, bits: int, axis: int | None, weight_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.bits, self.axis = bits, axis
        channels = weight_shape[axis] if axis is not None else 1
        self.alpha = nn.Parameter(torch.ones(channels, bits), requires_grad=False)
        self.codes = nn.Parameter(torch.ones((bits, *weight_shape)), requires_grad=False)
        self.mode = "quant"

    @classmethod
    def from_quantizer(cls, q: UniformQuantizer, w: torch.Tensor | None = None) -> MrBiQQuantizer:
        """Binary-code ``w`` with ``q``'s width and channel axis (``q``'s grid is not used)."""
        if w is None:
            raise ValueError("Mr.BiQ binary-codes weights only")
        axis = q.spec.axis
        w = w.detach().float()
        w2d = w.movedim(axis, 0).reshape(w.shape[axis], -1) if axis is not None else w.reshape(1, -1)
        alpha, codes = binary_code(w2d, q.spec.bits)
        new = cls(q.spec.bits, axis, tuple(w.shape))
        shape = w.movedim(axis, 0).shape if axis is not None else w.shape
        codes = codes.reshape(q.spec.bits, *shape)
        new.alpha.data = alpha
        new.codes.data = codes.movedim(1, axis + 1) if axis is not None else codes
        new.mode = q.mode
        return new.to(q.scale.device)

    def extra_repr(self) -> str:
        return f"binary-coded k={self.bits}, {'per-channel' if self.axis is not None else 'per-tensor'}"

    def _alpha(self, w: torch.Tensor) -> torch.Tensor:
        """``alpha`` (C, k) as (k, ...) broadcasting against the codes."""
        shape = [1] * (w.dim() + 1)
        if self.axis is not None:
            shape[self.axis + 1] = -1
        shape[0] = self.bits
        return self.alpha.T.reshape(shape)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.mode != "quant":
            return w
        self._check_shape(w)
        return (self._alpha(w) * self.codes).sum(0)

    def _scales(self) -> tuple[nn.Parameter, float]:
        return self.alpha, 1e-12


class MrBiQUniformQuantizer(UniformQuantizer, _Codes):
    """Binary codes tied to the calibrated uniform grid (module docstring)."""

    def __init__(self, spec, channels: int | None = None, weight_shape: tuple[int, ...] = (1,)) -> None:  # noqa: ANN001
        super().__init__(spec, channels)
        self.register_buffer("grid_scale", torch.ones_like(self.scale.data))
        self.codes = nn.Parameter(torch.ones((spec.bits, *weight_shape)), requires_grad=False)
        self.register_buffer("place", 2.0 ** torch.arange(spec.bits - 1, -1, -1, dtype=torch.float32))

    @classmethod
    def from_quantizer(cls, q: UniformQuantizer, w: torch.Tensor | None = None) -> MrBiQUniformQuantizer:
        """Codes that are the binary digits of ``q``'s round-to-nearest integers of ``w``."""
        new = on_weight_grid(cls, q, w, "Mr.BiQ-Uniform binary-codes a weight")
        with torch.no_grad():
            level = (q.grid_ints(w.detach().float()) - q.qmin).to(torch.int64)
            digits = [(level >> (q.spec.bits - 1 - i)) & 1 for i in range(q.spec.bits)]
            new.codes.data = torch.stack(digits).float() * 2.0 - 1.0
        return new

    def _ints(self) -> torch.Tensor:
        """``qmin + sum_i 2^(k-i) (c_i + 1) / 2``: the (relaxed, while training) grid integers."""
        place = self.place.reshape((-1,) + (1,) * (self.codes.dim() - 1))
        return self.qmin + (place * (self.codes + 1.0) * 0.5).sum(0)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.mode != "quant":
            return super().forward(w)
        self._check_shape(w)
        return self.level_values(self._ints(), w)

    @torch.no_grad()
    def int_repr(self, x: torch.Tensor) -> torch.Tensor:
        """The stored integers of the hard codes' grid integers."""
        q = self.qmin + (self.place.reshape((-1,) + (1,) * x.dim()) * (self.codes >= 0)).sum(0)
        return self.level_store(q.to(self.scale.dtype), x)

    def _scales(self) -> tuple[nn.Parameter, float]:
        return self.scale, 1e-8
