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
"""

from __future__ import annotations

import math

import torch

from qcompiler.quantizers.uniform import UniformQuantizer, _bcast, round_ste


def grad_scale(x: torch.Tensor, g: float) -> torch.Tensor:
    """``x`` in value, with its gradient multiplied by ``g``.

    The usual ``x * g + (x - x * g).detach()`` can differ from ``x`` by an ulp; adding
    ``x * g - (x * g).detach()`` (exactly zero) to ``x.detach()`` keeps the value bit-exact.
    """
    xg = x * g
    return x.detach() + (xg - xg.detach())


class LSQQuantizer(UniformQuantizer):
    """A fake quantizer trained with the LSQ step-size gradient; zero point fixed.

    Modes and QDrop (``drop_prob``) behave as in UniformQuantizer; in mode ``"quant"`` the value equals
    ``fake_quant`` bit for bit, only the step's gradient differs.
    """

    @classmethod
    def from_quantizer(cls, q: UniformQuantizer) -> LSQQuantizer:
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

    def grad_factor(self, x: torch.Tensor) -> float:
        """``g = 1 / sqrt(n * (qmax - qmin))`` with ``n`` the elements per step size."""
        n = x.numel() if self.spec.axis is None else x.numel() // max(x.shape[self.spec.axis], 1)
        return 1.0 / math.sqrt(max(n, 1) * (self.qmax - self.qmin))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode != "quant":
            return super().forward(x)
        s = _bcast(grad_scale(self.scale, self.grad_factor(x)), x, self.spec.axis)
        z = _bcast(self.zero_point, x, self.spec.axis)
        xq = (torch.clamp(round_ste(x / s) + z, self.qmin, self.qmax) - z) * s
        return self.drop(x, xq)
