"""partition: cut the quantized graph into reconstruction units.

Rule: a *cut* is a node every path from the model inputs to the model output passes through (it
dominates the output in the DAG, found with networkx; values derived from the inputs by no compute
op, such as an attention mask, are left out of that DAG: every unit may read them) and that is a
requantization point (an activation quantizer; in a weights-only graph, which has none, a compute
op's or a join's output after the clamp-like activations only it feeds) or starts a branch (two or
more users). Residual
adds and branch joins are therefore never cut inside: a residual block (or a transformer's
attention or feed-forward sublayer, whose normalised output the next residual reads again) lies
between two cuts.

- ``block``: a unit is the span between two consecutive cuts that contains a compute op
  (spans without one join the following unit). A chain of layers that all dominate the output (a
  block without a residual, e.g. a MobileNet/EfficientNet MBConv without skip) has a cut after
  every layer; there the module hierarchy decides: the unit only ends at a quantizer cut when the
  next compute op lives in another parent module (``_blocks.3._project_conv`` -> ``_blocks.3``).
  A cut where a branch starts always ends the unit.
- ``layer``: every compute op is its own unit, ending at the next requantization point that
  follows it (the output the integer kernel requantizes).

Each unit records its nodes (in graph order), its output node and the outside values it reads;
every node's unit index goes into ``node.meta["qc.unit"]``. The MRECG granularities start from the
``block`` units; the ``mrecg`` pass merges adjacent ones (:func:`merge_units`).
"""

from __future__ import annotations

import operator

import networkx as nx
import torch
from torch import fx

from qcompiler.config import GRANULARITIES
from qcompiler.errors import ConfigError, PostconditionError, PreconditionError
from qcompiler.ir import registry
from qcompiler.ir.passes import Pass, PassResult, require_graph
from qcompiler.ir.program import Program, Unit


def is_param_side(n: fx.Node) -> bool:
    return n.op == "get_attr" or n.meta.get("qc.quantizer") in ("weight", "bias")


def dataflow_graph(gm: fx.GraphModule) -> nx.DiGraph:
    """The activation dataflow DAG (parameters and their quantizers left out)."""
    g = nx.DiGraph()
    for n in gm.graph.nodes:
        if is_param_side(n):
            continue
        g.add_node(n.name)
        for m in n.all_input_nodes:
            if not is_param_side(m):
                g.add_edge(m.name, n.name)
    return g


def cuts(gm: fx.GraphModule) -> tuple[set[str], set[str]]:
    """The nodes every path from the inputs to the output passes through (dominators of the output),
    as ``(quantizers, branches)``: the requantization points among them, and those where a branch
    starts (two or more users: the value a residual or a join reads again later)."""
    g = dataflow_graph(gm)
    source = "__qc_source__"
    side = side_values(gm)
    g.remove_nodes_from(side)
    for v in list(g.nodes):
        if g.in_degree(v) == 0:
            g.add_edge(source, v)
    out = next(n for n in gm.graph.nodes if n.op == "output").name
    idom = nx.immediate_dominators(g, source)
    dominators, v = set(), out
    while v != source:
        dominators.add(v)
        v = idom[v]
    return requant_points(gm) & dominators, {v for v in dominators if v != out and g.out_degree(v) > 1}


def side_values(gm: fx.GraphModule) -> set[str]:
    """Values computed from the model inputs without any compute op or activation quantizer on the
    way that do not lead to the first quantizers (an attention mask and what is derived from it,
    position ids), and sizes (a batch size every ``view`` reads): every unit may read them, so they
    do not decide where units end. What feeds a quantizer reading only such values (the input, an
    embedding lookup before its first quantizer) is the data itself and stays."""
    early: set[str] = set()
    for n in gm.graph.nodes:
        if n.op == "output" or is_param_side(n) or n.meta.get("qc.quantizer") == "act":
            continue
        if registry.kind(n, gm) in registry.COMPUTE_KINDS:
            continue
        if all(m.name in early or is_param_side(m) for m in n.all_input_nodes):
            early.add(n.name)
    data: set[str] = set()
    stack = [m for n in gm.graph.nodes if n.meta.get("qc.quantizer") == "act"
             for m in n.all_input_nodes if m.name in early
             if all(x.name in early or is_param_side(x) for x in n.all_input_nodes)]
    while stack:
        m = stack.pop()
        if m.name not in data:
            data.add(m.name)
            stack.extend(x for x in m.all_input_nodes if x.name in early)
    sizes = {n.name for n in gm.graph.nodes if n.op not in ("placeholder", "output") and not _is_tensor(n)}
    return (early - data) | sizes


def requant_points(gm: fx.GraphModule) -> set[str]:
    """Where layer outputs are requantized: the activation quantizers, or in a weights-only graph
    (none) each compute op's and join's output after the clamp-like activations that only it feeds."""
    acts = {n.name for n in gm.graph.nodes if n.meta.get("qc.quantizer") == "act"}
    if acts:
        return acts
    points = set()
    for n in gm.graph.nodes:
        if registry.kind(n, gm) in registry.COMPUTE_KINDS | registry.JOIN_KINDS:
            while len(n.users) == 1 and registry.kind(next(iter(n.users)), gm) in registry.CLAMP_KINDS:
                n = next(iter(n.users))
            points.add(n.name)
    return points


class Partition(Pass):
    """Split the program into reconstruction units (``program.units``)."""

    name = "partition"

    def __init__(self, granularity: str | None = None) -> None:
        """``granularity``: layer or block; None takes the ``granularity`` knob of the program's config."""
        if granularity is not None and granularity not in GRANULARITIES:
            raise ConfigError(f"unknown granularity {granularity!r}; choose one of {', '.join(GRANULARITIES)}")
        self.granularity = granularity

    def requires(self, program: Program) -> None:
        require_graph(program, self.name)
        if not any(True for _ in program.quantizer_nodes("weight")):
            raise PreconditionError("partition needs quantizers: run insert_quantizers first")

    def run(self, program: Program) -> PassResult:
        gm = program.gm
        granularity = self.granularity or program.config.recon.granularity
        blocks = split(gm, blocks=True)
        units = blocks if granularity != "layer" else split(gm, blocks=False)  # MRECG merges blocks later
        set_units(program, units)
        program.state.granularity = granularity
        program.state.block_ends = [u.output for u in blocks]
        program.report["partition"] = {"granularity": granularity, "units": describe(units)}
        return PassResult(True, {"units": len(units), "granularity": granularity,
                                 "layers_per_unit": max(len(u.layers) for u in units)})

    def ensures(self, program: Program) -> None:
        units = program.units
        covered = [x for u in units for x in u.nodes]
        if len(covered) != len(set(covered)):
            raise PostconditionError("partition produced overlapping units")


def split(gm: fx.GraphModule, blocks: bool) -> list[Unit]:
    """The units of the module docstring: blocks, or (``blocks=False``) layers."""
    order = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output") and not is_param_side(n)]
    chain, branches = cuts(gm) if blocks else (_layer_ends(gm), set())
    ends = chain | branches
    compute = [i for i, n in enumerate(order) if registry.kind(n, gm) in registry.COMPUTE_KINDS]
    units: list[Unit] = []
    span: list[fx.Node] = []
    for i, n in enumerate(order):
        span.append(n)
        if n.name not in ends:
            continue
        inside = [m for m in span if registry.kind(m, gm) in registry.COMPUTE_KINDS]
        if not inside:
            continue
        if blocks and n.name not in branches:
            nxt = next((order[j] for j in compute if j > i), None)
            if nxt is not None and _scope(nxt.meta["qc.layer"]) == _scope(inside[-1].meta["qc.layer"]):
                continue  # a cut inside one module's chain of layers: the block goes on
        units.append(make_unit(gm, span, len(units)))
        span = []
    if span:  # trailing ops after the last cut (e.g. an unquantized head) join the last unit
        if not units:
            units.append(make_unit(gm, span, 0))
        else:
            last = units.pop()
            units.append(make_unit(gm, [gm_node(gm, x) for x in last.nodes] + span, len(units)))
    return units


def _layer_ends(gm: fx.GraphModule) -> set[str]:
    """After each compute op, the first requantization point downstream of it."""
    points, ends = requant_points(gm), set()
    for n in gm.graph.nodes:
        if registry.kind(n, gm) not in registry.COMPUTE_KINDS:
            continue
        v = n
        while v.name not in points and len(v.users) >= 1:
            v = next(iter(v.users))
            if v.op == "output":
                break
        if v.name in points:
            ends.add(v.name)
    return ends


def make_unit(gm: fx.GraphModule, span: list[fx.Node], index: int) -> Unit:
    """The unit of the nodes ``span`` (in graph order): its output is the last node, its inputs the
    activations it reads from outside (a size read from outside is recomputed inside, from the
    tensors it is taken of: those are inputs instead)."""
    names = {n.name for n in span}
    inputs: list[str] = []

    def read(m: fx.Node) -> None:
        if m.name in names or is_param_side(m) or m.name in inputs:
            return
        if _is_tensor(m):
            inputs.append(m.name)
        else:  # a size: recomputed inside the unit from the tensors it is taken of
            for a in m.all_input_nodes:
                read(a)

    for n in span:
        for m in n.all_input_nodes:
            read(m)
    layers = [n.meta["qc.layer"] for n in span if registry.kind(n, gm) in registry.COMPUTE_KINDS]
    return Unit(name=f"unit{index}:{layers[0] if layers else span[0].name}", nodes=[n.name for n in span],
                output=span[-1].name, inputs=inputs, layers=layers)


def _is_tensor(n: fx.Node) -> bool:
    """Whether ``n`` computes a tensor (not a size or a shape)."""
    val = n.meta.get("val")
    if val is not None:
        return isinstance(val, torch.Tensor)
    if n.target is getattr:
        return n.args[1] != "shape"
    if n.target is operator.getitem and isinstance(n.args[0], fx.Node):
        return _is_tensor(n.args[0])
    return True


def merge_units(gm: fx.GraphModule, units: list[Unit], groups: list[list[int]]) -> list[Unit]:
    """Units made of ``groups``, runs of consecutive indices of ``units`` that cover them in order."""
    if [i for g in groups for i in g] != list(range(len(units))):
        raise ValueError(f"merge groups {groups} do not cover units 0..{len(units) - 1} in order")
    nodes = {n.name: n for n in gm.graph.nodes}
    return [make_unit(gm, [nodes[x] for i in g for x in units[i].nodes], k) for k, g in enumerate(groups)]


def set_units(program: Program, units: list[Unit]) -> None:
    """Make ``units`` the program's, each node's index in ``node.meta["qc.unit"]``."""
    nodes = {n.name: n for n in program.gm.graph.nodes}
    for i, u in enumerate(units):
        for name in u.nodes:
            nodes[name].meta["qc.unit"] = i
    program.units = units


def describe(units: list[Unit]) -> list[dict]:
    """The units as report.json lists them."""
    return [{"name": u.name, "layers": u.layers, "nodes": u.nodes} for u in units]


def _scope(layer: str) -> str:
    """The parent module of a layer (``"layer1.0.conv2"`` -> ``"layer1.0"``; top level -> ``""``)."""
    return layer.rsplit(".", 1)[0] if "." in layer else ""


def gm_node(gm: fx.GraphModule, name: str) -> fx.Node:
    for n in gm.graph.nodes:
        if n.name == name:
            return n
    raise KeyError(name)
