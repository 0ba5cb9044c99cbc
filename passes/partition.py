"""partition: cut the quantized graph into reconstruction units.

Rule: a *cut* is an activation quantizer whose output every path from the model inputs to the
model output passes through (it dominates the output in the DAG, found with networkx). Residual
adds and branch joins are therefore never cut inside: a residual block lies between two cuts.

- ``block``: a unit is the span between two consecutive cuts that contains a compute op
  (spans without one join the following unit). A chain of layers that all dominate the output (a
  block without a residual, e.g. a MobileNet/EfficientNet MBConv without skip) has a cut after
  every layer; there the module hierarchy decides: the unit only ends at a cut when the next
  compute op lives in another parent module (``_blocks.3._project_conv`` -> ``_blocks.3``).
- ``layer``: every compute op is its own unit, ending at the next activation quantizer that
  follows it (the output the integer kernel requantizes).

Each unit records its nodes (in graph order), its output node and the outside values it reads;
every node's unit index goes into ``node.meta["qc.unit"]``. Later granularities (MRECG merges)
combine consecutive units of this list.
"""

from __future__ import annotations

import networkx as nx
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


def cuts(gm: fx.GraphModule) -> list[str]:
    """Activation quantizers that dominate the output, in graph order."""
    g = dataflow_graph(gm)
    source = "__qc_source__"
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            g.add_edge(source, n.name)
    out = next(n for n in gm.graph.nodes if n.op == "output").name
    idom = nx.immediate_dominators(g, source)
    dominators, v = set(), out
    while v != source:
        dominators.add(v)
        v = idom[v]
    return [n.name for n in gm.graph.nodes if n.name in dominators and n.meta.get("qc.quantizer") == "act"]


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
        if not any(True for _ in program.quantizer_nodes("act")):
            raise PreconditionError("partition needs activation quantizers: run insert_quantizers first")

    def run(self, program: Program) -> PassResult:
        gm = program.gm
        order = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output") and not is_param_side(n)]
        granularity = self.granularity or program.config.recon.granularity
        ends = set(cuts(gm)) if granularity == "block" else self._layer_ends(gm)
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
            if granularity == "block":
                nxt = next((order[j] for j in compute if j > i), None)
                if nxt is not None and _scope(nxt.meta["qc.layer"]) == _scope(inside[-1].meta["qc.layer"]):
                    continue  # a cut inside one module's chain of layers: the block goes on
            units.append(self._unit(gm, span, len(units)))
            span = []
        if span:  # trailing ops after the last cut (e.g. an unquantized head) join the last unit
            if not units:
                units.append(self._unit(gm, span, 0))
            else:
                last = units.pop()
                units.append(self._unit(gm, [gm_node(gm, x) for x in last.nodes] + span, len(units)))
        for i, u in enumerate(units):
            for name in u.nodes:
                gm_node(gm, name).meta["qc.unit"] = i
        program.units = units
        program.state.granularity = granularity
        return PassResult(True, {"units": len(units), "granularity": granularity,
                                 "layers_per_unit": max(len(u.layers) for u in units)})

    @staticmethod
    def _layer_ends(gm: fx.GraphModule) -> set[str]:
        """After each compute op, the first activation quantizer downstream of it."""
        ends = set()
        for n in gm.graph.nodes:
            if registry.kind(n, gm) not in registry.COMPUTE_KINDS:
                continue
            v = n
            while v.meta.get("qc.quantizer") != "act" and len(v.users) >= 1:
                v = next(iter(v.users))
                if v.op == "output":
                    break
            if v.meta.get("qc.quantizer") == "act":
                ends.add(v.name)
        return ends

    @staticmethod
    def _unit(gm: fx.GraphModule, span: list[fx.Node], index: int) -> Unit:
        names = {n.name for n in span}
        inputs: list[str] = []
        for n in span:
            for m in n.all_input_nodes:
                if m.name not in names and not is_param_side(m) and m.name not in inputs:
                    inputs.append(m.name)
        layers = [n.meta["qc.layer"] for n in span if registry.kind(n, gm) in registry.COMPUTE_KINDS]
        return Unit(name=f"unit{index}:{layers[0] if layers else span[0].name}", nodes=[n.name for n in span],
                    output=span[-1].name, inputs=inputs, layers=layers)

    def ensures(self, program: Program) -> None:
        units = program.units
        covered = [x for u in units for x in u.nodes]
        if len(covered) != len(set(covered)):
            raise PostconditionError("partition produced overlapping units")


def _scope(layer: str) -> str:
    """The parent module of a layer (``"layer1.0.conv2"`` -> ``"layer1.0"``; top level -> ``""``)."""
    return layer.rsplit(".", 1)[0] if "." in layer else ""


def gm_node(gm: fx.GraphModule, name: str) -> fx.Node:
    for n in gm.graph.nodes:
        if n.name == name:
            return n
    raise KeyError(name)
