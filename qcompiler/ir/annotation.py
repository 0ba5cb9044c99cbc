"""Quantization annotations: what a target asks to be quantized, node by node.

A target's ``annotate(gm, quant)`` returns :class:`Annotations`; ``insert_quantizers``
materialises them and knows no fact of any runtime. :func:`annotate_by_placement` is the rule for
targets that run integer kernels with requantized outputs, given their :class:`Placement` and
their weight-grid policy:

1. Every conv/linear gets a weight spec (the target's ``weight_spec`` for the layer's width).
2. Every activation input of a compute op (conv, linear, matmul) is quantized at that layer's
   activation width (the widest request wins).
3. The output of every compute op and join (add) is quantized after the clamp-like activations
   (relu, relu6, clamp) that are its only user, so the integer kernel requantizes once; except the
   outputs of kinds whose kernels can emit float (``Placement.float_output_kinds``): those are
   quantized only where rule 2 asks (an integer consumer reads them).
4. Join inputs and graph outputs are quantized; a join with an operand that rule 3 left float (a
   float-emitting kernel's output) stays float, its inputs and output too.
5. Embedding tables (``TABLE_KINDS``) get a symmetric weight spec at the first layer's width: a
   lookup multiplies nothing, so no kernel limits its grid.

A compute op matching a ``keep_float`` pattern gets none of this (it stays float, and is listed in
``kept_float`` with the reason). A view (reshape, transpose, dropout: ``registry.VIEW_KINDS``) is
never quantized: the quantizer goes on the tensor it views, so all views of one tensor share one
quantizer, and runtimes move the dequantization across the view.

A tensor quantized only because compute ops read it (rule 2; not produced by a requantizing
kernel, not a join operand nor a graph output) is read quantized by those compute ops (and the
views on the way to them) only: its other readers, computing in float (a residual add reading a
LayerNorm output), read the float value, as they do in the deployed graph (``readers``).

Tensors no compute op reads (add operands, graph outputs) multiply nothing: they are stored at the
placement's activation width (``act_storage_bits``), unless ``a_bits_all``; graph outputs at 8 bits
while ``first_last_8bit``. The first and last compute layers take 8 bits unless
``first_last_8bit`` is off; per-layer overrides win over both. A bias goes on the accumulator grid
``s_in * s_w`` where both its layer's input and weight are quantized and the target accumulates in
integers (``Placement.bias_on_accumulator``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import fx

from qcompiler.config import QuantConfig
from qcompiler.errors import PreconditionError
from qcompiler.ir import registry
from qcompiler.ir.target import Placement
from qcompiler.quantizers.grid import QSpec

#: ``weight_spec(bits, depthwise, quant) -> (spec, notes)``: a target's weight grid for a layer that
#: asks for ``bits``; ``notes`` name what the target changed (e.g. "narrowed", "kept symmetric").
WeightPolicy = Callable[[int, bool, QuantConfig], tuple[QSpec, list[str]]]


@dataclass
class Annotations:
    """Per node name: ``weights`` (compute op or table -> weight spec), ``acts`` (tensor -> activation
    spec, in insertion order), ``biases`` (compute ops whose bias is quantized on the accumulator
    grid), ``notes`` (note -> layers, for the log); ``kept_float``: layer -> why it stays float."""

    weights: dict[str, QSpec] = field(default_factory=dict)
    acts: dict[str, QSpec] = field(default_factory=dict)
    biases: list[str] = field(default_factory=list)
    notes: dict[str, list[str]] = field(default_factory=dict)
    kept_float: dict[str, str] = field(default_factory=dict)
    readers: dict[str, list[str]] = field(default_factory=dict)


def _is_float_tensor(node: fx.Node) -> bool:
    val = node.meta.get("val", node.meta.get("tensor_meta"))
    dtype = getattr(val, "dtype", None)
    return dtype is None or dtype.is_floating_point


def is_depthwise(node: fx.Node, gm: fx.GraphModule) -> bool:
    """A conv whose every group reads one input channel."""
    w = registry.get_tensor(gm, str(registry.args_of(node, gm)["weight"].target))
    return registry.kind(node, gm) == "conv" and w.dim() > 2 and w.shape[1] == 1 and w.shape[0] > 1


def annotate_by_placement(gm: fx.GraphModule, quant: QuantConfig, place: Placement,
                          weight_spec: WeightPolicy) -> Annotations:
    """The module docstring's rule over ``gm``, whose compute ops carry ``qc.layer`` names."""
    every = [n for n in gm.graph.nodes if registry.kind(n, gm) in registry.COMPUTE_KINDS]
    ends = {every[0], every[-1]}
    ann = Annotations()
    for n in every:
        if quant.kept_float(n.meta["qc.layer"]):
            ann.kept_float[n.meta["qc.layer"]] = "matches --keep-float"
    compute = [n for n in every if n.meta["qc.layer"] not in ann.kept_float]
    layer_bits = {n: quant.bits_for(n.meta["qc.layer"], n in ends) for n in compute}
    kernel_bits: dict[fx.Node, int] = {}
    other_bits: dict[fx.Node, int] = {}
    storage = quant.a_bits if quant.a_bits_all else place.act_storage_bits

    def want(t: object, bits: int | None = None) -> None:
        """Quantize ``t``: as a compute op's input at ``bits``, or (None) as a stored tensor."""
        t = registry.view_source(t, gm)
        if isinstance(t, fx.Node) and _is_float_tensor(t) and t.op != "get_attr":
            if bits is None:
                other_bits[t] = storage
            else:
                kernel_bits[t] = max(kernel_bits.get(t, 0), bits)

    def after_clamps(n: fx.Node) -> fx.Node:
        while len(n.users) == 1:
            user = next(iter(n.users))
            if registry.kind(user, gm) not in registry.CLAMP_KINDS:
                break
            n = user
        return n

    for node in compute if quant.a_bits is not None else []:  # weights only: activations stay float
        a = registry.args_of(node, gm)
        if place.compute_inputs:
            want(a["input"], layer_bits[node][1])
            if registry.kind(node, gm) == "matmul":
                want(a["other"], layer_bits[node][1])
        if place.compute_outputs and registry.kind(node, gm) not in place.float_output_kinds:
            want(after_clamps(node))

    def left_float(t: object) -> bool:
        t = registry.view_source(t, gm)
        return registry.kind(t, gm) in place.float_output_kinds and t not in kernel_bits and t not in other_bits

    for node in gm.graph.nodes if quant.a_bits is not None else []:
        if registry.kind(node, gm) in place.join_kinds:
            a = registry.args_of(node, gm)
            if left_float(a["input"]) or left_float(a["other"]):
                continue
            want(a["input"])
            want(a["other"])
            want(after_clamps(node))
    if place.graph_outputs and quant.a_bits is not None:
        out_node = next(n for n in gm.graph.nodes if n.op == "output")
        for t in out_node.all_input_nodes:
            want(t)
            if quant.first_last_8bit and t in other_bits:
                other_bits[t] = 8
    for t, bits in {**other_bits, **kernel_bits}.items():  # what a compute op reads takes its width
        ann.acts[t.name] = QSpec(bits, place.act_signed, False, None)
        if t not in other_bits and registry.kind(t, gm) not in registry.COMPUTE_KINDS:
            readers = [u.name for u in t.users if registry.kind(u, gm) in registry.COMPUTE_KINDS | registry.VIEW_KINDS]
            if len(readers) < len(t.users):
                ann.readers[t.name] = readers
    for node in compute:
        if registry.kind(node, gm) not in registry.WEIGHTED_KINDS:
            continue
        a = registry.args_of(node, gm)
        if not (isinstance(a["weight"], fx.Node) and a["weight"].op == "get_attr"):
            raise PreconditionError(f"layer {node.meta['qc.layer']}: its weight is computed, not a parameter; "
                                    "weights must be parameters to be quantized")
        spec, notes = weight_spec(layer_bits[node][0], is_depthwise(node, gm), quant)
        ann.weights[node.name] = spec
        for note in notes:
            ann.notes.setdefault(note, []).append(node.meta["qc.layer"])
        b = a.get("bias")
        x = registry.view_source(a["input"], gm)
        if place.bias_on_accumulator and isinstance(b, fx.Node) and b.op == "get_attr" \
                and isinstance(x, fx.Node) and x.name in ann.acts:
            ann.biases.append(node.name)
    for node in gm.graph.nodes:
        if registry.kind(node, gm) in registry.TABLE_KINDS:
            w = registry.args_of(node, gm)["weight"]
            if isinstance(w, fx.Node) and w.op == "get_attr":
                bits = quant.bits_for(node.meta.get("qc.layer", node.name), True)[0]
                ann.weights[node.name] = QSpec(bits, place.weight_signed, True, 0 if quant.per_channel else None)
    return ann
