"""FlexRound: learn the weight grid's divisor element-wise (Lee et al., ICML 2023).

Rule: with the calibrated grid of the quantizer it replaces (spec, step ``s``, zero point ``z``),

    D     = S2 * s3 [* s4]        S2 per weight, s3 per output channel, s4 per input channel (convs)
    w_hat = Q_s1(w / D)           Q: the uniform rule of the spec (affine, midrise or centered) at step s1

with s1 (the shape of ``s``: per channel or per tensor, as calibrated), S2, s3 and s4 positive,
learned as logarithms (s1 as ``s * exp(r1)``), all starting at ``log 1 = 0``, so that the
quantizer starts exactly at round-to-nearest. Training passes the rounding straight through (a
weight whose level is clamped passes no gradient through ``w / D``): the gradient with respect to
S2 is ``-s1 * [inside] * w / (s1 * D * S2)``, i.e. proportional to ``-w / S2^2``, and s1 receives
LSQ's ``level - w / (s1 D)`` inside the range and ``level`` outside. One learning rate
(``recon.weight_lr()``, the paper's), or, when ``recon.w_step_lr`` is set, that rate for S2 alone
and ``w_step_lr`` for the shared s1, s3 and s4 (a rate on a logarithm is relative to the value, as
the other families' step rates are); constant either way (cosine-decayed to 0 with
``recon.w_lr_decay``), no regulariser. Hardening keeps ``D`` as a buffer: the stored integers are
the uniform grid's integers of ``w / D`` read with step s1, so the lowering is any uniform weight's.
"""

from __future__ import annotations

import torch
from torch import nn

from qcompiler.quantizers.family import ParamGroup, Trainable, on_weight_grid
from qcompiler.quantizers.grid import QSpec, bcast
from qcompiler.quantizers.uniform import UniformQuantizer


class FlexRoundQuantizer(UniformQuantizer, Trainable):
    """A weight quantizer that learns ``D`` and the step s1 (module docstring)."""

    def __init__(self, spec: QSpec, channels: int | None = None, weight_shape: tuple[int, ...] = (1,)) -> None:
        super().__init__(spec, channels)
        out_shape = (weight_shape[0],) + (1,) * (len(weight_shape) - 1)
        self.log_r1 = nn.Parameter(torch.zeros_like(self.scale.data), requires_grad=False)  # s1 = s * exp(r1)
        self.register_buffer("grid_scale", torch.ones_like(self.scale.data))  # s, the calibrated step
        self.log_s2 = nn.Parameter(torch.zeros(weight_shape), requires_grad=False)
        self.log_s3 = nn.Parameter(torch.zeros(out_shape), requires_grad=False)
        self.log_s4 = None
        if len(weight_shape) > 2:  # convolutions: one more divisor per input channel
            self.log_s4 = nn.Parameter(torch.zeros((1, weight_shape[1]) + (1,) * (len(weight_shape) - 2)),
                                       requires_grad=False)
        self.register_buffer("divisor", torch.ones(weight_shape))
        self.training_grid = False

    @classmethod
    def from_quantizer(cls, q: UniformQuantizer, w: torch.Tensor | None = None) -> FlexRoundQuantizer:
        """A FlexRound quantizer on ``q``'s grid that starts at round-to-nearest."""
        return on_weight_grid(cls, q, w, "FlexRound learns a weight's grid")

    def _s1(self) -> torch.Tensor:
        return self.grid_scale * self.log_r1.exp()

    def _divisor(self) -> torch.Tensor:
        d = self.log_s2 + self.log_s3
        if self.log_s4 is not None:
            d = d + self.log_s4
        return d.exp()

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.mode != "quant":
            return super().forward(w)
        if not self.training_grid:
            return super().forward(w / self.divisor)
        s1 = self._s1()
        s1_w, d = bcast(s1, w, self.spec.axis), self._divisor()
        x = w / (s1_w * d)  # the weight in steps of s1
        with torch.no_grad():
            self.scale.data = s1.detach()
            v = super().forward(w.detach() / d.detach())  # the grid's value of w / D at step s1
            level = v / s1_w.detach()
            inside = ((level - x.detach()).abs() <= 0.5).to(x.dtype)
        # the value is v exactly; the gradient is the straight-through one of s1 * level(x)
        return v + s1_w.detach() * inside * (x - x.detach()) + level * (s1_w - s1_w.detach())

    @torch.no_grad()
    def int_repr(self, x: torch.Tensor) -> torch.Tensor:
        """The uniform grid's integers of ``x / D`` (read with step s1)."""
        return super().int_repr(x / self.divisor)

    # -- the trainer's protocol (family.Trainable)

    def _learned(self) -> list[nn.Parameter]:
        return [p for p in (self.log_r1, self.log_s2, self.log_s3, self.log_s4) if p is not None]

    def begin_training(self, recon) -> list[ParamGroup]:  # noqa: ANN001 - ReconConfig
        """S2 at ``recon.weight_lr()``; s1, s3 (and s4) at ``recon.w_step_lr`` when it is set, else at
        the same rate as S2; constant, or cosine-decayed with ``recon.w_lr_decay``."""
        self.training_grid = True
        for p in self._learned():
            p.requires_grad_(True)
        if recon.w_step_lr <= 0:
            return [ParamGroup("flexround", self._learned(), recon.weight_lr(), decay=recon.w_lr_decay)]
        shared = [p for p in self._learned() if p is not self.log_s2]
        return [ParamGroup("flexround", [self.log_s2], recon.weight_lr(), decay=recon.w_lr_decay),
                ParamGroup("flexround.shared", shared, recon.w_step_lr, decay=recon.w_lr_decay)]

    @torch.no_grad()
    def harden(self) -> None:
        """Freeze s1 into ``scale`` and ``D`` into ``divisor``: the forward is the uniform rule of ``w / D``."""
        self.training_grid = False
        self.scale.data = self._s1()
        self.divisor.data = self._divisor()
        for p in self._learned():
            p.requires_grad_(False)
