"""split_outliers: input channels of linear layers that dwarf the others are split into equal copies.

Rule: for every tensor that linear layers read (directly, or as its rows ``flatten(x, 0, -2)``),
take each channel's largest magnitude over the calibration batches. With a budget of
``ceil(split_outliers * C)`` extra channels, give one more copy, again and again, to the channel
whose copies are the largest, until the budget is spent or no copy exceeds twice the median
channel. The readers then read ``split_channels(x, ...) = x[..., index] * scale`` with ``index``
every channel, then the extra copies, and a channel in ``n`` copies scaled by ``1 / n``, and each
reader's weight repeats the same columns, ``W[:, index]``: ``n`` copies of ``x / n`` times the
same column give the same product, while a per-tensor activation step sized by the largest
channel shrinks by the split. The weights keep their values (per-channel scales migrated into
the weights would coarsen their grids); the integer product gets a few more columns, and other
readers (a residual add) still read ``x``.

Runs before quantizer insertion, so the readers' weight quantizers and the activation quantizer
see the split tensors.
"""

from __future__ import annotations

import heapq
import logging
import math

import torch
from torch import fx

from qcompiler.ir import registry
from qcompiler.ir.passes import Pass, PassResult, require_graph
from qcompiler.ir.program import Program, run_calibration

log = logging.getLogger("qcompiler.split_outliers")


def split_channels(x: torch.Tensor, extra: torch.Tensor, scale: torch.Tensor, extra_scale: torch.Tensor
                   ) -> torch.Tensor:
    """``x`` times ``scale`` per channel, followed by the channels ``extra`` picks (the copies) times
    ``extra_scale``: ``x[..., index] * scale`` with ``index = [0, ..., C - 1] + extra``, without
    gathering the whole tensor (a last-axis gather is an element-wise copy in ORT)."""
    return torch.cat([x * scale, x.index_select(-1, extra) * extra_scale], -1)


def copies(absmax: torch.Tensor, budget: int) -> list[int]:
    """How many copies each channel gets (module docstring): the greedy split of the largest copy."""
    n = [1] * len(absmax)
    limit = 2.0 * float(absmax.median())
    heap = [(-float(m), k) for k, m in enumerate(absmax)]
    heapq.heapify(heap)
    for _ in range(budget):
        top, k = heap[0]
        if -top <= limit:
            break
        n[k] += 1
        heapq.heapreplace(heap, (-float(absmax[k]) / n[k], k))
    return n


def _weight_target(node: fx.Node, gm: fx.GraphModule) -> str | None:
    """The dotted path of a linear layer's weight, when this layer alone reads it."""
    if node.op == "call_module":
        return f"{node.target}.weight" if sum(n.target == node.target for n in gm.graph.nodes) == 1 else None
    w = registry.args_of(node, gm).get("weight")
    if isinstance(w, fx.Node) and w.op == "get_attr" and len(w.users) == 1 and \
            sum(n.op == "get_attr" and n.target == w.target for n in gm.graph.nodes) == 1:
        return str(w.target)
    return None


def _readers(src: fx.Node, gm: fx.GraphModule) -> list[tuple[fx.Node, fx.Node]] | None:
    """(linear, the node it reads ``src`` through) for every linear reading ``src`` directly or as rows."""
    out = []
    for user in src.users:
        if registry.kind(user, gm) == "linear" and registry.input_of(user) is src:
            out.append((user, user))
        elif registry.rows_of(user) is src and user.users and \
                all(registry.kind(u, gm) == "linear" and registry.input_of(u) is user for u in user.users):
            out += [(u, user) for u in user.users]
    if not out or any(_weight_target(lin, gm) is None for lin, _ in out):
        return None
    return out


def channel_absmax(gm: fx.GraphModule, nodes: list[fx.Node], program: Program) -> dict[fx.Node, torch.Tensor]:
    """Each node's per-channel (last dimension) largest magnitude over the calibration batches."""
    found: dict[fx.Node, torch.Tensor] = {}

    def record(x: torch.Tensor, i: int) -> None:
        m = x.detach().abs().reshape(-1, x.shape[-1]).amax(0)
        found[nodes[i]] = m if nodes[i] not in found else torch.maximum(found[nodes[i]], m)

    probes = []
    for i, node in enumerate(nodes):
        with gm.graph.inserting_after(node):
            probes.append(gm.graph.call_function(record, (node, i)))
    gm.recompile()
    try:
        run_calibration(gm, program)
    finally:
        for p in probes:
            gm.graph.erase_node(p)
        gm.recompile()
    return found


class SplitOutliers(Pass):
    """Split the outlier input channels of linear layers into equal copies (module docstring)."""

    name = "split_outliers"

    def requires(self, program: Program) -> None:
        require_graph(program, self.name)

    def run(self, program: Program) -> PassResult:
        share = program.config.quant.split_outliers
        if share <= 0:
            return PassResult(False, {"split": "off"})
        gm = program.gm
        sources = {}
        for node in gm.graph.nodes:
            if registry.kind(node, gm) == "linear" and node.op in ("call_function", "call_module"):
                src = registry.input_of(node)
                src = registry.rows_of(src) or src
                if isinstance(src, fx.Node) and src not in sources:
                    sources[src] = _readers(src, gm)
        sources = {s: r for s, r in sources.items() if r}
        if not sources:
            return PassResult(False, {"tensors": 0})
        found = channel_absmax(gm, list(sources), program)
        tensors = extra = 0
        for i, (src, readers) in enumerate(sources.items()):
            absmax = found.get(src)
            if absmax is None or absmax.numel() < 8:
                continue
            n = copies(absmax, math.ceil(share * absmax.numel()))
            if max(n) == 1:
                continue
            index = torch.tensor(list(range(len(n))) + [k for k, c in enumerate(n) for _ in range(c - 1)])
            scale = torch.tensor([1.0 / n[k] for k in index.tolist()])
            self._rewire(gm, src, readers, index, scale, len(n), f"qc_split{i}")
            tensors += 1
            extra += len(index) - len(n)
            log.info("%s: %d channel(s) split into %d extra copies (largest channel %.3g, median channel %.3g, "
                     "largest copy now %.3g)", src.name, sum(c > 1 for c in n), len(index) - len(n),
                     float(absmax.max()), float(absmax.median()),
                     float((absmax / torch.tensor(n, dtype=absmax.dtype)).max()))
        gm.graph.lint()
        gm.recompile()
        return PassResult(bool(tensors), {"tensors": tensors, "extra_channels": extra})

    @staticmethod
    def _rewire(gm: fx.GraphModule, src: fx.Node, readers: list, index: torch.Tensor, scale: torch.Tensor,
                channels: int, name: str) -> None:
        """Readers of ``src`` read ``split_channels`` of it (``index`` is ``[0, ..., channels - 1]`` and
        the copies), their weights' columns repeated as ``index`` says."""
        buffers = {"extra": index[channels:], "scale": scale[:channels], "extra_scale": scale[channels:]}
        g = gm.graph
        args, at = [src], src
        for key, value in buffers.items():
            gm.register_buffer(f"{name}_{key}", value.contiguous())
            with g.inserting_after(at):
                at = g.get_attr(f"{name}_{key}")
            args.append(at)
        with g.inserting_after(at):
            split = g.call_function(split_channels, tuple(args))
        for linear, via in readers:
            target = _weight_target(linear, gm)
            w = registry.get_tensor(gm, target)
            registry.set_parameter(gm, target, w.detach()[:, index].contiguous())
            via.replace_input_with(src, split)
            if linear.op == "call_module":
                gm.get_submodule(linear.target).in_features = len(index)
