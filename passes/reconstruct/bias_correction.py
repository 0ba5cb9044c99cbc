"""Empirical bias correction, a hook around each unit's training (the ``bias_correct`` knob).

Rule: before and after training a unit, each of its weighted layers, in graph order, gets its bias
shifted (``BiasQuantizer.shift``, the quantized layer only) by the per-channel mean by which its
output in the quantized unit (fed the quantized stream, the layers before it already corrected)
differs from its output in the float unit (fed the float stream), over the training rows. Inputs
after ReLU/ReLU6 have large means, so weight rounding errors that do not sum to zero per channel
shift whole channels; a correction moves them back.
"""

from __future__ import annotations

import torch
from torch import fx

from qcompiler.ir import registry
from qcompiler.ir.program import Unit
from qcompiler.passes.reconstruct.units import bias_quantizer_of, modes, unit_module


class UnitHook:
    """Something done to a unit just before and just after its training (the trainer's hooks)."""

    def before(self, gm: fx.GraphModule, unit: Unit, fp_in: list[torch.Tensor], q_in: list[torch.Tensor]) -> None:
        """Called with the unit's training rows of the float and the quantized stream."""

    def after(self, gm: fx.GraphModule, unit: Unit, fp_in: list[torch.Tensor], q_in: list[torch.Tensor]) -> None:
        """Called with the same rows once the unit is trained (before it is measured)."""


class BiasCorrection(UnitHook):
    """The module docstring's rule; the float means of ``before`` are reused by ``after``."""

    def __init__(self) -> None:
        self._float_means: list[torch.Tensor] | None = None

    def before(self, gm, unit, fp_in, q_in) -> None:  # noqa: ANN001 - see UnitHook
        self._float_means = correct_biases(gm, unit, fp_in, q_in)

    def after(self, gm, unit, fp_in, q_in) -> None:  # noqa: ANN001
        correct_biases(gm, unit, fp_in, q_in, self._float_means)
        self._float_means = None


def correct_biases(gm: fx.GraphModule, unit: Unit, fp_in: list[torch.Tensor], q_in: list[torch.Tensor],
                   f_means: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Apply the rule once; return the float means, to pass back when correcting again."""
    nodes = {n.name: n for n in gm.graph.nodes}
    layers = [x for x in unit.nodes if registry.kind(nodes[x], gm) in registry.WEIGHTED_KINDS
              and bias_quantizer_of(nodes[x], gm) is not None]
    if not layers:
        return []
    sub = unit_module(gm, unit, layers)
    axes = [1 if registry.kind(nodes[x], gm) == "conv" else -1 for x in layers]
    if f_means is None:
        f_means = channel_means(gm, sub, fp_in, False, axes)
    for k, name in enumerate(layers):
        bq = bias_quantizer_of(nodes[name], gm)
        q_mean = channel_means(gm, sub, q_in, True, axes)[k]
        bq.shift -= (q_mean - f_means[k]).to(bq.shift.dtype)
    return f_means


def channel_means(gm: fx.GraphModule, sub: fx.GraphModule, inputs: list[torch.Tensor], quant: bool,
                  axes: list[int], chunk: int = 256) -> list[torch.Tensor]:
    """Per-channel means (float64) of ``sub``'s extra outputs over all rows of ``inputs``; ``axes``
    gives each output's channel dimension."""
    sums: list[torch.Tensor] = [torch.zeros(())] * len(axes)
    counts = [0] * len(axes)
    with modes(gm, sub, "quant" if quant else "off"), torch.no_grad():
        for s in range(0, inputs[0].shape[0], chunk):
            outs = sub(*[x[s:s + chunk] for x in inputs])[1:]
            for k, (o, ax) in enumerate(zip(outs, axes, strict=True)):
                ax %= o.dim()
                sums[k] = sums[k] + o.double().sum(dim=[d for d in range(o.dim()) if d != ax])
                counts[k] += o.numel() // o.shape[ax]
    return [t / c for t, c in zip(sums, counts, strict=True)]
