"""insert_quantizers: materialise the target's quantization annotations as fake quantizers.

Rule: name every compute op (``qc.layer``: the module path of its weight), check every per-layer
override matches a layer, then ask the target what to quantize (``program.target.annotate``:
:class:`~qcompiler.ir.annotation.Annotations`) and insert exactly that:

1. a weight quantizer between each annotated layer's weight and the op;
2. an activation quantizer after each annotated tensor, read by all its users (a quantized tensor
   is quantized once, as every user reads the DequantizeLinear output in the deployed graph), or
   by the ones the annotation names (``Annotations.readers``: the others read the float value);
3. a bias quantizer on each annotated layer's bias, on its kernel's accumulator grid
   (:class:`~qcompiler.quantizers.bias.BiasQuantizer`, the one place that rule lives).

Which tensors, which widths and which grids are the target's decision; this pass knows no runtime.
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
from qcompiler.quantizers.uniform import UniformQuantizer

log = logging.getLogger("qcompiler.insert_quantizers")

#: How the log words the layers a target annotated differently from what was asked.
NOTES = {"narrowed": "asked for more weight bits than the target computes exactly; stored narrower",
         "kept symmetric": "keep symmetric weights: a centered asymmetric grid needs one bit more than the target "
                           "computes exactly"}


class InsertQuantizers(Pass):
    """Insert weight and activation quantizers as the target's placement rules say."""

    name = "insert_quantizers"

    def requires(self, program: Program) -> None:
        require_graph(program, self.name)
        if program.target is None:
            raise PreconditionError("insert_quantizers needs program.target: Program(target=...); compile() sets it")
        if any(True for _ in program.quantizer_nodes()):
            raise PreconditionError("the graph already has quantizers")

    def run(self, program: Program) -> PassResult:
        gm, cfg = program.gm, program.config.quant
        registry.functionalize(gm)
        compute = [n for n in gm.graph.nodes if registry.kind(n, gm) in registry.COMPUTE_KINDS]
        if not compute:
            raise PreconditionError(f"{program.source}: the model has no conv, linear or matmul to quantize")
        matched = set()
        patterns = [*cfg.overrides, *cfg.keep_float]
        for node in gm.graph.nodes:
            if registry.kind(node, gm) in registry.COMPUTE_KINDS | registry.TABLE_KINDS:
                node.meta["qc.layer"] = name = registry.layer_name(node, gm)
                matched |= {p for p in patterns if fnmatch.fnmatchcase(name, p)}
        unmatched = set(patterns) - matched
        if unmatched:
            names = ", ".join(registry.layer_name(n, gm) for n in compute[:6])
            raise ConfigError(f"layer pattern(s) {sorted(unmatched)} match no layer; layers are named like {names}")
        ann = program.target.annotate(gm, cfg)
        nodes = {n.name: n for n in gm.graph.nodes}

        for name, spec in ann.weights.items():
            node = nodes[name]
            w_node = registry.args_of(node, gm)["weight"]
            w = registry.get_tensor(gm, str(w_node.target))
            q = UniformQuantizer(spec, w.shape[0] if spec.axis is not None else None)
            qname = _unique(gm, "qc_w_" + node.meta["qc.layer"].replace(".", "_"))
            gm.add_submodule(qname, q)
            with gm.graph.inserting_after(w_node):
                qn = gm.graph.call_module(qname, (w_node,))
            qn.meta.update({"qc.quantizer": "weight", "qc.qspec": spec, "qc.layer": node.meta["qc.layer"]})
            registry.set_arg(node, gm, "weight", qn)

        for name, spec in ann.acts.items():
            t = nodes[name]
            qname = _unique(gm, f"qc_a_{t.name}")
            gm.add_submodule(qname, UniformQuantizer(spec))
            with gm.graph.inserting_after(t):
                qn = gm.graph.call_module(qname, (t,))
            readers = ann.readers.get(name)
            t.replace_all_uses_with(qn, delete_user_cb=lambda user, qn=qn, readers=readers: user is not qn and (
                readers is None or user.name in readers))
            qn.meta.update({"qc.quantizer": "act", "qc.qspec": spec, "qc.of": t.name})
            if "val" in t.meta:
                qn.meta["val"] = t.meta["val"]

        for name in ann.biases:
            node = nodes[name]
            a = registry.args_of(node, gm)
            b_node, x_node, w_node = a["bias"], registry.view_source(a["input"], gm), a["weight"]
            bq = BiasQuantizer(gm.get_submodule(x_node.target), gm.get_submodule(w_node.target),
                               registry.get_tensor(gm, str(b_node.target)).shape[0])
            bname = _unique(gm, f"qc_b_{node.meta['qc.layer'].replace('.', '_')}")
            gm.add_submodule(bname, bq)
            with gm.graph.inserting_after(b_node):
                bn = gm.graph.call_module(bname, (b_node,))
            bn.meta.update({"qc.quantizer": "bias", "qc.layer": node.meta["qc.layer"]})
            registry.set_arg(node, gm, "bias", bn)
        gm.graph.lint()
        gm.recompile()
        program.state.quantized_layers = [n.meta["qc.layer"] for n in compute
                                          if n.meta["qc.layer"] not in ann.kept_float]
        program.state.float_layers = dict(ann.kept_float)
        if ann.kept_float:
            log.info("%d layer(s) kept in float: %s", len(ann.kept_float), ", ".join(list(ann.kept_float)[:5]))
        for note, layers in ann.notes.items():
            log.info("%d layer(s) %s: %s", len(layers), NOTES.get(note, note),
                     ", ".join(layers[:5]) + (" ..." if len(layers) > 5 else ""))
        log.info("inserted %d weight and %d activation quantizers over %d compute layers",
                 len(ann.weights), len(ann.acts), len(compute))
        return PassResult(True, {"weight_quantizers": len(ann.weights), "act_quantizers": len(ann.acts),
                                 "bias_quantizers": len(ann.biases), "compute_layers": len(compute),
                                 **{note.replace(" ", "_") + "_weights": len(v) for note, v in ann.notes.items()}})

    def ensures(self, program: Program) -> None:
        gm = program.gm
        for node in gm.graph.nodes:
            if registry.kind(node, gm) in registry.WEIGHTED_KINDS and \
                    node.meta.get("qc.layer") not in program.state.float_layers:
                w = registry.args_of(node, gm)["weight"]
                if not (isinstance(w, fx.Node) and w.meta.get("qc.quantizer") == "weight"):
                    raise PostconditionError(f"layer {node.meta.get('qc.layer', node.name)} has no weight quantizer")


def _unique(gm: fx.GraphModule, base: str) -> str:
    name, i = base, 0
    while hasattr(gm, name):
        i += 1
        name = f"{base}_{i}"
    return name

