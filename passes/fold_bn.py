"""fold_bn: fold eval-mode BatchNorm into the conv or linear that feeds it alone.

Rule: for ``y = BN(conv(x))`` where the conv's only user is the BN, the conv's weight becomes
``W * g / sqrt(v + eps)`` (per output channel) and its bias ``(b - m) * g / sqrt(v + eps) + beta``;
the BN disappears. A BN with other producers, in training mode, or whose conv weight is shared is
left alone and named in the log.
"""

from __future__ import annotations

import logging

import torch
from torch import fx

from qcompiler.errors import PostconditionError
from qcompiler.ir import registry
from qcompiler.ir.passes import Pass, PassResult, require_graph
from qcompiler.ir.program import Program

log = logging.getLogger("qcompiler.fold_bn")


def _foldable(program: Program, bn_node: fx.Node) -> tuple[fx.Node, registry.BatchNormView] | None:
    gm = program.gm
    view = registry.batchnorm_view(bn_node, gm)
    if view is None or not isinstance(view.input, fx.Node):
        return None
    conv = view.input
    if registry.kind(conv, gm) not in ("conv", "linear") or len(conv.users) != 1:
        return None
    w = registry.args_of(conv, gm)["weight"]
    if not (isinstance(w, fx.Node) and w.op == "get_attr" and len(w.users) == 1):
        return None
    return conv, view


class FoldBatchNorm(Pass):
    """Fold eval-mode BatchNorm into the preceding conv or linear."""

    name = "fold_bn"

    def requires(self, program: Program) -> None:
        require_graph(program, self.name)

    def run(self, program: Program) -> PassResult:
        gm = program.gm
        registry.functionalize(gm)
        folded, skipped = 0, []
        for node in list(gm.graph.nodes):
            if registry.kind(node, gm) != "batchnorm" or node.graph is None:
                continue
            found = _foldable(program, node)
            if found is None:
                skipped.append(node.name)
                continue
            conv, bn = found
            self._fold(gm, conv, bn)
            bn.output.replace_all_uses_with(conv)
            for n in dict.fromkeys((bn.output, node)):
                if n.graph is not None and not n.users:
                    gm.graph.erase_node(n)
            folded += 1
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
        if skipped:
            log.info("left %d BatchNorm unfolded (no conv/linear feeding them alone): %s", len(skipped), skipped)
        return PassResult(folded > 0, {"folded": folded, "unfolded": len(skipped)})

    @staticmethod
    @torch.no_grad()
    def _fold(gm: fx.GraphModule, conv: fx.Node, bn: registry.BatchNormView) -> None:
        args = registry.args_of(conv, gm)
        w_node = args["weight"]
        w = registry.get_tensor(gm, str(w_node.target))
        factor = torch.rsqrt(bn.var + bn.eps)
        if bn.weight is not None:
            factor = factor * bn.weight
        beta = bn.bias if bn.bias is not None else torch.zeros_like(bn.mean)
        b_node = args.get("bias")
        b = registry.get_tensor(gm, str(b_node.target)) if isinstance(b_node, fx.Node) else torch.zeros_like(bn.mean)
        shape = [-1] + [1] * (w.dim() - 1)
        registry.set_parameter(gm, str(w_node.target), w * factor.reshape(shape))
        new_b = (b - bn.mean) * factor + beta
        if isinstance(b_node, fx.Node) and b_node.op == "get_attr" and len(b_node.users) == 1:
            registry.set_parameter(gm, str(b_node.target), new_b)
            return
        base = str(w_node.target).rsplit(".", 1)[0] + ".bias" if "." in str(w_node.target) else "qc_bias"
        target, i = base, 0
        while _exists(gm, target):
            i += 1
            target = f"{base}_{i}"
        registry.set_parameter(gm, target, new_b)
        with gm.graph.inserting_before(conv):
            new_node = gm.graph.get_attr(target)
        registry.set_arg(conv, gm, "bias", new_node)

    def ensures(self, program: Program) -> None:
        for node in program.gm.graph.nodes:
            if registry.kind(node, program.gm) == "batchnorm" and _foldable(program, node) is not None:
                raise PostconditionError(f"fold_bn left a foldable BatchNorm: {node.name}")


def _exists(gm: fx.GraphModule, target: str) -> bool:
    try:
        registry.get_tensor(gm, target)
        return True
    except AttributeError:
        return False
