"""A reconstruction unit as a runnable graph, its quantizers, and the loss it is trained on."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import fx, nn

from qcompiler.ir import registry
from qcompiler.ir.program import Unit
from qcompiler.passes.partition import is_param_side
from qcompiler.passes.reconstruct.qdrop import memory_order
from qcompiler.quantizers.bias import BiasQuantizer


def unit_module(gm: fx.GraphModule, unit: Unit, extra_outputs: list[str]) -> fx.GraphModule:
    """A GraphModule computing ``unit`` from its inputs; it shares gm's modules and parameters.
    Its outputs: the unit's output, then ``extra_outputs`` (names of nodes inside the unit)."""
    nodes = {n.name: n for n in gm.graph.nodes}
    g = fx.Graph()
    env: dict[str, fx.Node] = {name: g.placeholder(name) for name in unit.inputs}

    def copy(n: fx.Node) -> fx.Node:
        if n.name not in env:
            for m in n.all_input_nodes:
                copy(m)
            env[n.name] = g.node_copy(n, lambda m: env[m.name])
        return env[n.name]

    for name in unit.nodes:
        n = nodes[name]
        for m in n.all_input_nodes:
            if is_param_side(m):
                copy(m)
        copy(n)
    outs = [env[unit.output]] + [env[x] for x in extra_outputs]
    g.output(tuple(outs))
    return fx.GraphModule(gm, g)


def quantizers_of(gm: fx.GraphModule, sub: fx.GraphModule, which: str) -> list[nn.Module]:
    """The ``which`` ("act"/"weight") quantizer modules a unit's graph calls."""
    return [gm.get_submodule(str(n.target)) for n in sub.graph.nodes if n.meta.get("qc.quantizer") == which]


def bias_quantizer_of(n: fx.Node, gm: fx.GraphModule) -> BiasQuantizer | None:
    """The quantizer of weighted layer ``n``'s bias, or None."""
    b = registry.args_of(n, gm).get("bias")
    if isinstance(b, fx.Node) and b.meta.get("qc.quantizer") == "bias":
        return gm.get_submodule(str(b.target))
    return None


def swap(gm: fx.GraphModule, target: str, new: nn.Module) -> None:
    """Replace a quantizer submodule, re-pointing bias quantizers that reference the old one."""
    old = gm.get_submodule(target)
    gm.add_submodule(target, new)
    for m in gm.modules():
        if isinstance(m, BiasQuantizer):
            m.refs = tuple(new if r is old else r for r in m.refs)


def needed_later(units: list[Unit]) -> list[set[str]]:
    """For unit i, the names it produces that some later unit reads (its output always)."""
    produced = {x: i for i, u in enumerate(units) for x in u.nodes}
    out = [{u.output} for u in units]
    for u in units:
        for x in u.inputs:
            if x in produced:
                out[produced[x]].add(x)
    return out


@contextlib.contextmanager
def modes(gm: fx.GraphModule, sub: fx.GraphModule, mode: str) -> Iterator[None]:
    """Every quantizer of ``sub`` in ``mode`` inside the block, back to its own mode after."""
    saved = [(q, q.mode) for which in ("act", "weight") for q in quantizers_of(gm, sub, which)]
    for q, _ in saved:
        q.mode = mode
    try:
        yield
    finally:
        for q, m in saved:
            q.mode = m


def forward(gm: fx.GraphModule, sub: fx.GraphModule, inputs: list[torch.Tensor], quant: bool,
            chunk: int = 256) -> list[torch.Tensor]:
    """``sub``'s outputs over all rows of ``inputs``, quantizers on or off, ``chunk`` rows at a time."""
    with modes(gm, sub, "quant" if quant else "off"):
        outs = [sub(*[x[s:s + chunk] for x in inputs]) for s in range(0, inputs[0].shape[0], chunk)]
    return [torch.cat([o[k] for o in outs]) for k in range(len(outs[0]))]


def unit_loss(gm: fx.GraphModule, sub: fx.GraphModule, q_in: list[torch.Tensor], fp_out: torch.Tensor,
              n: int | None = 256) -> float:
    """The quantized unit's loss on the first ``n`` rows (all with None; nan without rows)."""
    if fp_out.shape[0] == 0:
        return float("nan")
    with torch.no_grad():
        out = forward(gm, sub, [x[:n] for x in q_in], quant=True)[0]
        return float(rec_loss(out, fp_out[:n]))


def output_energy(fp_out: torch.Tensor, n: int = 256) -> float:
    """The float output's own size in the loss's units: the loss of an all-zero output on the first
    ``n`` rows (squares summed over channels, averaged over the rest)."""
    with torch.no_grad():
        x = fp_out[:n]
        return float(rec_loss(x, torch.zeros_like(x)))


class _RecLoss(torch.autograd.Function):
    """Squared error summed over channels (dim 1), averaged over the rest, in two passes.

    Written with autograd's ops (sub, pow, sum, mean and their backwards) the loss made eight
    passes over an activation-sized tensor; here the forward is one difference and one dot product,
    the backward one scaled copy.
    """

    @staticmethod
    def forward(ctx, out, target):
        d = out - target
        n = out.numel() / out.shape[1] if out.dim() > 1 else out.numel()
        ctx.save_for_backward(d)
        ctx.n = n
        flat = memory_order(d)  # the order does not matter to a sum
        return torch.dot(flat, flat) / n

    @staticmethod
    def backward(ctx, g):
        (d,) = ctx.saved_tensors
        return d * (g * (2.0 / ctx.n)), None


def rec_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error summed over channels (dim 1), averaged over the rest (BRECQ's lp loss, p = 2)."""
    return _RecLoss.apply(out, target)
