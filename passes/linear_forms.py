"""linear_forms: every matrix product with a parameter becomes a linear layer on rows.

Rule: ``addmm(b, x, W)``, ``mm(x, W)`` and ``matmul(x, W)`` whose ``W`` is a 2-D parameter (GPT-2's
``Conv1D`` stores its weight as ``in x out``) become ``linear(x, W^T, b)``: the parameter keeps its
name and now holds ``W^T``, so the layer is named after its module like any ``nn.Linear``. A
linear layer whose input has more than two dimensions runs on the input's rows,
``unflatten(linear(flatten(x, 0, -2), W, b), 0, x.shape[:-1])``: the same values, and a 2-D linear
is what integer GEMM kernels with an int32 bias take (ONNX ``Gemm``; a batched ``MatMul`` would
leave its bias to a float ``Add``).
"""

from __future__ import annotations

import logging
import operator

import torch
import torch.nn.functional as F
from torch import fx
from torch.fx.passes.shape_prop import ShapeProp

from qcompiler.ir import registry
from qcompiler.ir.passes import Pass, PassResult, require_graph
from qcompiler.ir.program import Program

log = logging.getLogger("qcompiler.linear_forms")


def _parameter(node: object, gm: fx.GraphModule) -> torch.Tensor | None:
    if isinstance(node, fx.Node) and node.op == "get_attr":
        t = registry.get_tensor(gm, str(node.target))
        if isinstance(t, torch.Tensor) and t.dim() == 2 and t.is_floating_point():
            return t
    return None


def _rank(node: object) -> int | None:
    if not isinstance(node, fx.Node):
        return None
    val, tm = node.meta.get("val"), node.meta.get("tensor_meta")
    if isinstance(val, torch.Tensor):
        return val.dim()
    return len(tm.shape) if tm is not None and hasattr(tm, "shape") else None


class LinearForms(Pass):
    """Rewrite parameter matrix products as ``F.linear`` on 2-D inputs (module docstring)."""

    name = "linear_forms"

    def requires(self, program: Program) -> None:
        require_graph(program, self.name)

    def run(self, program: Program) -> PassResult:
        gm = program.gm
        registry.functionalize(gm)
        transposed = rowwise = 0
        for node in list(gm.graph.nodes):
            if self._as_linear(gm, node):
                transposed += 1
        linears = [n for n in gm.graph.nodes if registry.kind(n, gm) == "linear" and n.op == "call_function"]
        if any(_rank(registry.args_of(n, gm)["input"]) is None for n in linears) and \
                isinstance(program.example_inputs, tuple):
            ShapeProp(gm).propagate(*program.example_inputs)  # a symbolic_trace graph carries no shapes
        for node in linears:
            if self._on_rows(gm, node):
                rowwise += 1
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
        return PassResult(bool(transposed or rowwise), {"transposed_weights": transposed, "rowwise_linears": rowwise})

    @staticmethod
    def _as_linear(gm: fx.GraphModule, node: fx.Node) -> bool:
        k = registry.kind(node, gm)
        if k not in ("addmm", "mm", "matmul"):
            return False
        a = registry.args_of(node, gm)
        w = _parameter(a["other"], gm)
        bias = a.get("bias")
        if w is None or len(a["other"].users) != 1 or a.get("beta", 1) != 1 or a.get("alpha", 1) != 1:
            return False
        if bias is not None and not (isinstance(bias, fx.Node) and bias.op == "get_attr"):
            return False
        target = str(a["other"].target)
        registry.set_parameter(gm, target, w.t().contiguous())
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(F.linear, (a["input"], a["other"], bias))
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        return True

    @staticmethod
    def _on_rows(gm: fx.GraphModule, node: fx.Node) -> bool:
        a = registry.args_of(node, gm)
        x = a["input"]
        if not isinstance(x, fx.Node) or (_rank(x) or 2) <= 2:
            return False
        g = gm.graph
        with g.inserting_before(node):
            rows = g.call_function(torch.flatten, (x, 0, -2))
        registry.set_arg(node, gm, "input", rows)
        with g.inserting_after(node):
            shape = g.call_function(getattr, (x, "shape"))
        with g.inserting_after(shape):
            lead = g.call_function(operator.getitem, (shape, slice(None, -1)))
        with g.inserting_after(lead):
            back = g.call_function(torch.unflatten, (node, 0, lead))
        node.replace_all_uses_with(back, delete_user_cb=lambda user: user is not back)
        if "val" in node.meta:
            back.meta["val"] = node.meta.pop("val")
        return True
