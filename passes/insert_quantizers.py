"""insert_quantizers: put fake quantizers where the target will run integer arithmetic.

Rule (the target's :class:`~qcompiler.ir.target.Placement` decides which parts apply):

1. Every conv/linear gets a weight quantizer between its weight and the op (per output channel
   or per tensor; symmetric or asymmetric; in the target's weight container).
2. Every activation input of a compute op (conv, linear, matmul) is quantized.
3. The output of every compute op and join (add) is quantized after the clamp-like activations
   (relu, relu6, clamp) that are its only user, so the integer kernel requantizes once.
4. Join inputs and graph outputs are quantized.

Activation widths: a tensor a compute op reads takes that layer's width; the others (add operands,
graph outputs) are stored at the target's activation width (8 bits), unless ``a_bits_all``.

A quantized tensor is quantized once: all its users read the quantizer's output, as they read the
DequantizeLinear output in the deployed graph. Widths: the config's ``w_bits``/``a_bits``; the
first and last compute layers (weights and inputs) and graph outputs at 8 bits unless
``first_last_8bit`` is off (graph outputs then take the width of the other stored tensors);
per-layer overrides win over both.
"""

from __future__ import annotations

import fnmatch
import logging

from torch import fx

from qcompiler.errors import ConfigError, PostconditionError, PreconditionError
from qcompiler.ir import registry
from qcompiler.ir.passes import Pass, PassResult, require_graph
from qcompiler.ir.program import Program
from qcompiler.quantizers.bias import BiasQuantizer
from qcompiler.quantizers.uniform import QSpec, UniformQuantizer

log = logging.getLogger("qcompiler.insert_quantizers")


def _is_float_tensor(node: fx.Node) -> bool:
    val = node.meta.get("val", node.meta.get("tensor_meta"))
    dtype = getattr(val, "dtype", None)
    return dtype is None or dtype.is_floating_point


class InsertQuantizers(Pass):
    """Insert weight and activation quantizers as the target's placement rules say."""

    name = "insert_quantizers"

    def requires(self, program: Program) -> None:
        require_graph(program, self.name)
        if program.target is None:
            raise PreconditionError("insert_quantizers needs program.target (the pipeline sets it)")
        if any(True for _ in program.quantizer_nodes()):
            raise PreconditionError("the graph already has quantizers")

    def run(self, program: Program) -> PassResult:
        gm, cfg = program.gm, program.config
        place = program.target.placement()
        registry.functionalize(gm)
        compute = [n for n in gm.graph.nodes if registry.kind(n, gm) in registry.COMPUTE_KINDS]
        if not compute:
            raise PreconditionError(f"{program.source}: the model has no conv, linear or matmul to quantize")
        ends = {compute[0], compute[-1]}
        matched = set()
        layer_bits: dict[fx.Node, tuple[int, int]] = {}
        for node in compute:
            name = registry.layer_name(node, gm)
            node.meta["qc.layer"] = name
            layer_bits[node] = cfg.bits_for(name, node in ends)
            for pattern in cfg.overrides:
                if fnmatch.fnmatchcase(name, pattern):
                    matched.add(pattern)
        unmatched = set(cfg.overrides) - matched
        if unmatched:
            names = ", ".join(registry.layer_name(n, gm) for n in compute[:6])
            raise ConfigError(f"override pattern(s) {sorted(unmatched)} match no layer; layers are named like {names}")

        # Activation quantization points. A tensor a compute op reads takes that layer's activation
        # width (the widest request wins); a tensor no compute op reads (an add operand, a graph
        # output) multiplies nothing, so it is stored at the target's activation width, unless
        # ``a_bits_all`` asks for the activation width there too. (QDrop's and BRECQ's reference code
        # leave those tensors in float.)
        kernel_bits: dict[fx.Node, int] = {}
        other_bits: dict[fx.Node, int] = {}
        storage = cfg.a_bits if cfg.a_bits_all else place.act_storage_bits

        def want(t: object, bits: int | None = None) -> None:
            """Quantize ``t``: as a compute op's input at ``bits``, or (None) as a stored tensor."""
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

        for node in compute:
            a = registry.args_of(node, gm)
            _, a_bits = layer_bits[node]
            if place.compute_inputs:
                want(a["input"], a_bits)
                if registry.kind(node, gm) == "matmul":
                    want(a["other"], a_bits)
            if place.compute_outputs:
                want(after_clamps(node))
        for node in list(gm.graph.nodes):
            if registry.kind(node, gm) in place.join_kinds:
                a = registry.args_of(node, gm)
                want(a["input"])
                want(a["other"])
                want(after_clamps(node))
        if place.graph_outputs:
            out_node = next(n for n in gm.graph.nodes if n.op == "output")
            for t in out_node.all_input_nodes:
                want(t)
                if cfg.first_last_8bit and t in other_bits:
                    other_bits[t] = 8
        points = {**other_bits, **kernel_bits}  # what a compute op reads takes its width

        # Weight quantizers.
        n_w, narrowed, kept_symmetric = 0, [], []
        for node in compute:
            if registry.kind(node, gm) not in registry.WEIGHTED_KINDS:
                continue
            w_node = registry.args_of(node, gm)["weight"]
            if not (isinstance(w_node, fx.Node) and w_node.op == "get_attr"):
                raise PreconditionError(f"layer {node.meta['qc.layer']}: its weight is computed, not a parameter; "
                                        "weights must be parameters to be quantized")
            w = registry.get_tensor(gm, str(w_node.target))
            depthwise = registry.kind(node, gm) == "conv" and w.dim() > 2 and w.shape[1] == 1 and w.shape[0] > 1
            max_bits = place.max_weight_bits_depthwise if depthwise else place.max_weight_bits
            w_bits = min(layer_bits[node][0], max_bits)
            if w_bits < layer_bits[node][0]:
                narrowed.append(node.meta["qc.layer"])
            # Asymmetric weights (the default where they fit) on kernels that want a zero weight zero
            # point are stored centered (q - z), which needs one more bit; where that does not fit they
            # stay symmetric. Up to the midrise width their zero points may also be half-integers (two
            # bits more). ResNet-20 W2A4 qdrop: symmetric 69.3, midrise 74.7, centered 76.3, with half-integer
            # zero points 76.7; W4A4 symmetric 79.9 / 79.5 (two seeds), centered 79.5 (one run each).
            # Depthwise convs too: EfficientNet-Lite0 W4A4 qdrop (200 iterations) on its validation
            # images, centered depthwise weights 79.54, symmetric 79.38 (bench/README.md).
            symmetric, centered = cfg.w_symmetric is True, False
            if not symmetric and place.weight_zero_point_zero:
                centered = place.weight_signed and w_bits + 1 <= max_bits
                symmetric = not centered
                if symmetric and cfg.w_symmetric is False:
                    kept_symmetric.append(node.meta["qc.layer"])
            halves = centered and w_bits <= cfg.w_midrise and w_bits + 2 <= max_bits
            # Narrow symmetric grids go midrise (no zero level) when the odd integers they store still fit.
            midrise = (symmetric and w_bits <= cfg.w_midrise and place.weight_signed and w_bits + 1 <= max_bits)
            spec = QSpec(w_bits, place.weight_signed, symmetric, 0 if cfg.per_channel else None, midrise,
                         centered, halves)
            q = UniformQuantizer(spec, w.shape[0] if cfg.per_channel else None)
            qname = _unique(gm, "qc_w_" + node.meta["qc.layer"].replace(".", "_"))
            gm.add_submodule(qname, q)
            with gm.graph.inserting_after(w_node):
                qn = gm.graph.call_module(qname, (w_node,))
            qn.meta.update({"qc.quantizer": "weight", "qc.qspec": spec, "qc.layer": node.meta["qc.layer"]})
            registry.set_arg(node, gm, "weight", qn)
            n_w += 1

        # Activation quantizers.
        act_q: dict[fx.Node, fx.Node] = {}
        for t, bits in points.items():
            spec = QSpec(bits, place.act_signed, False, None)
            qname = _unique(gm, f"qc_a_{t.name}")
            gm.add_submodule(qname, UniformQuantizer(spec))
            with gm.graph.inserting_after(t):
                qn = gm.graph.call_module(qname, (t,))
            t.replace_all_uses_with(qn, delete_user_cb=lambda user, qn=qn: user is not qn)
            qn.meta.update({"qc.quantizer": "act", "qc.qspec": spec, "qc.of": t.name})
            if "val" in t.meta:
                qn.meta["val"] = t.meta["val"]
            act_q[t] = qn

        # Bias quantizers: the int32 grid s_in * s_w of the integer kernel's accumulator.
        n_b = 0
        for node in compute:
            a = registry.args_of(node, gm)
            b_node, x_node, w_node = a.get("bias"), a["input"], a.get("weight")
            if not (isinstance(b_node, fx.Node) and b_node.op == "get_attr" and isinstance(w_node, fx.Node)
                    and w_node.meta.get("qc.quantizer") == "weight" and x_node in act_q.values()):
                continue
            bq = BiasQuantizer(gm.get_submodule(x_node.target), gm.get_submodule(w_node.target),
                               registry.get_tensor(gm, str(b_node.target)).shape[0])
            bname = _unique(gm, f"qc_b_{node.meta['qc.layer'].replace('.', '_')}")
            gm.add_submodule(bname, bq)
            with gm.graph.inserting_after(b_node):
                bn = gm.graph.call_module(bname, (b_node,))
            bn.meta.update({"qc.quantizer": "bias", "qc.layer": node.meta["qc.layer"]})
            registry.set_arg(node, gm, "bias", bn)
            n_b += 1
        gm.graph.lint()
        gm.recompile()
        program.artifacts["quantized_layers"] = [n.meta["qc.layer"] for n in compute]
        stats = {"weight_quantizers": n_w, "act_quantizers": len(points), "bias_quantizers": n_b,
                 "compute_layers": len(compute), "narrowed_weights": len(narrowed),
                 "symmetric_fallback_weights": len(kept_symmetric)}
        if narrowed:
            log.info("%d layer(s) asked for more weight bits than target %s computes exactly; stored at %d bits: %s",
                     len(narrowed), getattr(program.target, "name", "?"), place.max_weight_bits,
                     ", ".join(narrowed[:5]) + (" ..." if len(narrowed) > 5 else ""))
        if kept_symmetric:
            log.info("%d layer(s) keep symmetric weights: a centered asymmetric grid needs one bit more than the "
                     "target computes exactly: %s", len(kept_symmetric),
                     ", ".join(kept_symmetric[:5]) + (" ..." if len(kept_symmetric) > 5 else ""))
        log.info("inserted %d weight and %d activation quantizers over %d compute layers",
                 n_w, len(points), len(compute))
        return PassResult(True, stats)

    def ensures(self, program: Program) -> None:
        gm = program.gm
        for node in gm.graph.nodes:
            if registry.kind(node, gm) in registry.WEIGHTED_KINDS:
                w = registry.args_of(node, gm)["weight"]
                if not (isinstance(w, fx.Node) and w.meta.get("qc.quantizer") == "weight"):
                    raise PostconditionError(f"layer {node.meta.get('qc.layer', node.name)} has no weight quantizer")


def _unique(gm: fx.GraphModule, base: str) -> str:
    name, i = base, 0
    while hasattr(gm, name):
        i += 1
        name = f"{base}_{i}"
    return name

