"""The protocol a quantizer family implements to be learned by reconstruction.

The trainer knows a family only through these methods: it swaps a calibrated quantizer for the
family's (``from_quantizer``), asks it for its trainable parameters with their learning rates
(``begin_training``), calls ``before_step`` / ``after_step`` around every optimizer step, adds
``regularizer()`` (times the ``reg_weight`` knob) to the loss, reads ``convergence()`` and ends
with ``harden()``. Checkpoints hold the family's ``state_dict``; a resumed unit is hardened again.
A family that learns nothing (plain uniform quantizers) does not implement it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class ParamGroup:
    """Parameters learned at one Adam learning rate. Groups with the same ``key`` share one optimizer
    group; ``decay``: the rate follows a cosine from ``lr`` to 0 over the unit's iterations."""

    key: str
    params: list[nn.Parameter]
    lr: float
    decay: bool = False


def on_weight_grid(cls: type, q: nn.Module, w: torch.Tensor | None, family: str) -> nn.Module:
    """A ``cls`` quantizer for weight ``w`` on the calibrated ``q``'s grid: spec, step (also kept as
    the fixed ``grid_scale`` the family places its grid with), zero point and mode copied."""
    if w is None:
        raise ValueError(f"{family}: it quantizes weights only")
    channels = q.scale.numel() if q.spec.axis is not None else None
    new = cls(q.spec, channels, tuple(w.shape))
    with torch.no_grad():
        new.scale.data = q.scale.detach().clone()
        new.grid_scale.data = q.scale.detach().clone()
        new.zero_point.data = q.zero_point.detach().clone()
    new.mode = q.mode
    return new.to(q.scale.device)


class Trainable:
    """Mixin of the quantizer families reconstruction learns (see the module docstring)."""

    @classmethod
    def from_quantizer(cls, q: nn.Module, tensor: torch.Tensor | None = None) -> nn.Module:
        """A quantizer of this family computing what the calibrated ``q`` computes; ``tensor`` is the
        weight a weight quantizer quantizes (None for activations)."""
        raise NotImplementedError

    def begin_training(self, recon) -> list[ParamGroup]:  # noqa: ANN001 - qcompiler.config.ReconConfig
        """Make the parameters trainable for one unit's ``recon.iters`` iterations; return them."""
        raise NotImplementedError

    def before_step(self, it: int) -> None:
        """Called before iteration ``it``'s forward."""

    def regularizer(self) -> torch.Tensor | None:
        """The term this quantizer adds to the loss in the current iteration (after the forward)."""
        return None

    def after_step(self) -> None:
        """Called after the optimizer step (e.g. to keep step sizes positive)."""

    def convergence(self) -> tuple[int, int] | None:
        """(undecided, total) of a learned discrete choice, or None."""
        return None

    def harden(self) -> None:
        """End training: freeze the learned values into what is deployed."""
        raise NotImplementedError
