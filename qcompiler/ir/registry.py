"""The one op registry: recognises an fx node's operation in any capture form.

A model captured by ``fx.symbolic_trace`` calls modules (``nn.Conv2d``), functions (``F.conv2d``,
``operator.add``) and tensor methods (``x.relu()``); one captured by ``torch.export`` calls aten
overloads (``aten.conv2d.default``). Passes never look at ``node.target`` themselves: they ask the
registry for the op's *kind* and for a normalised view of its arguments, so no pass special-cases
the capture path.

Kinds: ``conv``, ``linear``, ``matmul`` (compute ops), ``add`` (join), ``relu``, ``hardtanh``,
``clamp`` (clamp-like activations), ``embedding`` (a table lookup: weighted, computes nothing),
``batchnorm``, ``avgpool``, ``maxpool``, ``flatten``, ``reshape``, ``softmax``, ``dropout``, and the
forms canonicalisation rewrites: ``attention`` (scaled_dot_product_attention), ``addmm``, ``mm``.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

aten = torch.ops.aten

COMPUTE_KINDS = frozenset({"conv", "linear", "matmul"})
WEIGHTED_KINDS = frozenset({"conv", "linear"})
TABLE_KINDS = frozenset({"embedding"})
#: Ops whose output holds the values of their input, rearranged: a quantized input stays quantized.
VIEW_KINDS = frozenset({"reshape", "flatten", "view", "dropout"})
CLAMP_KINDS = frozenset({"relu", "hardtanh", "clamp"})
JOIN_KINDS = frozenset({"add"})


@dataclass(frozen=True)
class OpDef:
    """One operation: its kind, the targets that spell it, and its argument schema."""

    kind: str
    modules: tuple[type, ...] = ()
    functions: tuple[Any, ...] = ()
    methods: tuple[str, ...] = ()
    schema: tuple[str, ...] = ()            # positional argument names of function/method forms
    defaults: tuple[tuple[str, Any], ...] = ()


_DEFS: list[OpDef] = [
    OpDef("conv", (nn.Conv1d, nn.Conv2d, nn.Conv3d),
          (F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d,
           aten.conv1d.default, aten.conv2d.default, aten.conv3d.default,
           aten.conv1d.padding, aten.conv2d.padding, aten.conv3d.padding),
          schema=("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
          defaults=(("bias", None), ("stride", 1), ("padding", 0), ("dilation", 1), ("groups", 1))),
    OpDef("linear", (nn.Linear,), (F.linear, aten.linear.default),
          schema=("input", "weight", "bias"), defaults=(("bias", None),)),
    OpDef("matmul", (), (torch.matmul, operator.matmul, torch.bmm, aten.matmul.default, aten.bmm.default),
          ("matmul", "bmm"), schema=("input", "other")),
    OpDef("add", (), (operator.add, torch.add, aten.add.Tensor), ("add",),
          schema=("input", "other", "alpha"), defaults=(("alpha", 1),)),
    OpDef("relu", (nn.ReLU,), (F.relu, torch.relu, aten.relu.default, aten.relu_.default), ("relu",),
          schema=("input",)),
    OpDef("hardtanh", (nn.ReLU6, nn.Hardtanh), (F.relu6, F.hardtanh, aten.hardtanh.default, aten.relu6.default), (),
          schema=("input", "min_val", "max_val"), defaults=(("min_val", -1.0), ("max_val", 1.0))),
    OpDef("clamp", (), (torch.clamp, torch.clip, aten.clamp.default), ("clamp", "clip"),
          schema=("input", "min", "max"), defaults=(("min", None), ("max", None))),
    OpDef("batchnorm", (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d), (F.batch_norm,),
          schema=("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"),
          defaults=(("weight", None), ("bias", None), ("training", False), ("momentum", 0.1), ("eps", 1e-5))),
    OpDef("batchnorm", (), (aten.batch_norm.default,),
          schema=("input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps",
                  "cudnn_enabled")),
    OpDef("batchnorm", (), (aten._native_batch_norm_legit_no_training.default,),
          schema=("input", "weight", "bias", "running_mean", "running_var", "momentum", "eps")),
    OpDef("avgpool", (nn.AvgPool2d, nn.AdaptiveAvgPool2d),
          (F.avg_pool2d, F.adaptive_avg_pool2d, aten.avg_pool2d.default, aten.adaptive_avg_pool2d.default,
           aten.mean.dim), ("mean",), schema=("input",)),
    OpDef("maxpool", (nn.MaxPool2d,), (F.max_pool2d, aten.max_pool2d.default), (), schema=("input",)),
    OpDef("flatten", (nn.Flatten,), (torch.flatten, aten.flatten.using_ints), ("flatten",), schema=("input",)),
    OpDef("reshape", (), (torch.reshape, aten.reshape.default, aten.view.default), ("view", "reshape"),
          schema=("input",)),
    OpDef("softmax", (nn.Softmax,), (F.softmax, torch.softmax, aten.softmax.int, aten._softmax.default),
          ("softmax",), schema=("input",)),
    OpDef("dropout", (nn.Dropout,), (F.dropout, aten.dropout.default), (), schema=("input",)),
    OpDef("view", (), (torch.transpose, torch.permute, torch.unflatten, aten.transpose.int, aten.permute.default,
                       aten.unflatten.int, aten.contiguous.default, aten.clone.default, aten.t.default),
          ("transpose", "permute", "unflatten", "contiguous", "t"), schema=("input",)),
    OpDef("embedding", (nn.Embedding,), (F.embedding,), schema=("input", "weight")),
    OpDef("embedding", (), (aten.embedding.default,), schema=("weight", "input")),
    OpDef("attention", (), (F.scaled_dot_product_attention, aten.scaled_dot_product_attention.default),
          schema=("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"),
          defaults=(("attn_mask", None), ("dropout_p", 0.0), ("is_causal", False), ("scale", None),
                    ("enable_gqa", False))),
    OpDef("addmm", (), (torch.addmm, aten.addmm.default), schema=("bias", "input", "other", "beta", "alpha"),
          defaults=(("beta", 1), ("alpha", 1))),
    OpDef("mm", (), (torch.mm, aten.mm.default), ("mm",), schema=("input", "other")),
]

_BY_MODULE: dict[type, OpDef] = {}
_BY_FUNCTION: dict[Any, OpDef] = {}
_BY_METHOD: dict[str, OpDef] = {}
for _d in _DEFS:
    for _m in _d.modules:
        _BY_MODULE[_m] = _d
    for _f in _d.functions:
        _BY_FUNCTION[_f] = _d
    for _name in _d.methods:
        _BY_METHOD[_name] = _d


def register(opdef: OpDef) -> None:
    """Teach the registry a new op form (for model-specific modules or functions)."""
    _DEFS.append(opdef)
    for m in opdef.modules:
        _BY_MODULE[m] = opdef
    for f in opdef.functions:
        _BY_FUNCTION[f] = opdef
    for name in opdef.methods:
        _BY_METHOD[name] = opdef


def lookup(node: fx.Node, gm: fx.GraphModule) -> OpDef | None:
    """The definition of ``node``'s operation, or None for ops the registry does not know."""
    if node.op == "call_module":
        return _BY_MODULE.get(type(gm.get_submodule(node.target)))
    if node.op == "call_function":
        d = _BY_FUNCTION.get(node.target)
        if d is not None and d.kind == "add" and not _both_tensors(node):
            return None  # tensor + scalar is not a join
        return d
    if node.op == "call_method":
        d = _BY_METHOD.get(node.target)
        if d is not None and d.kind == "add" and not _both_tensors(node):
            return None
        return d
    return None


def kind(node: fx.Node, gm: fx.GraphModule) -> str | None:
    """The op kind of ``node`` (see the module docstring), or None."""
    d = lookup(node, gm)
    return d.kind if d is not None else None


def _both_tensors(node: fx.Node) -> bool:
    return len(node.args) >= 2 and all(isinstance(a, fx.Node) for a in node.args[:2])


def args_of(node: fx.Node, gm: fx.GraphModule) -> dict[str, Any]:
    """The node's arguments by schema name, defaults filled in (function and method forms)."""
    d = lookup(node, gm)
    if d is None:
        raise KeyError(f"op {node.format_node()} is not in the registry")
    out = dict(d.defaults)
    for name, value in zip(d.schema, node.args, strict=False):
        out[name] = value
    for name, value in node.kwargs.items():
        out[name] = value
    return out


def set_arg(node: fx.Node, gm: fx.GraphModule, name: str, value: Any) -> None:
    """Set argument ``name`` of a function/method-form node, positionally when it is positional."""
    d = lookup(node, gm)
    assert d is not None
    idx = d.schema.index(name)
    if idx < len(node.args):
        args = list(node.args)
        args[idx] = value
        node.args = tuple(args)
    else:
        kwargs = dict(node.kwargs)
        kwargs[name] = value
        node.kwargs = kwargs


def input_of(node: fx.Node) -> fx.Node:
    """The first (data) input of a unary op in any form."""
    if node.args:
        return node.args[0]
    return next(iter(node.kwargs.values()))


def view_source(node: object, gm: fx.GraphModule) -> object:
    """The tensor whose values ``node`` holds, followed back through view ops (``VIEW_KINDS``)."""
    while isinstance(node, fx.Node) and kind(node, gm) in VIEW_KINDS:
        node = input_of(node)
    return node


def rows_of(node: object) -> fx.Node | None:
    """The tensor ``node`` holds as rows, ``flatten(x, 0, -2)`` (a linear layer's input in the form
    ``linear_forms`` gives it), or None."""
    if isinstance(node, fx.Node) and node.target is torch.flatten and tuple(node.args[1:]) == (0, -2):
        return node.args[0]
    return None


# ---------------------------------------------------------------- parameters


def get_tensor(gm: fx.GraphModule, target: str) -> torch.Tensor:
    """The parameter or buffer at dotted path ``target``."""
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def set_parameter(gm: fx.GraphModule, target: str, value: torch.Tensor) -> None:
    """Create or replace the parameter at dotted path ``target``."""
    *path, leaf = target.split(".")
    mod = gm.get_submodule(".".join(path)) if path else gm
    if hasattr(mod, leaf):
        delattr(mod, leaf)
    mod.register_parameter(leaf, nn.Parameter(value.detach().clone(), requires_grad=False))


def _conv_function(mod: nn.Module) -> Callable:
    return {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}[type(mod)]


def _weight_bias(gm: fx.GraphModule, target: str, mod: nn.Module) -> tuple[fx.Node, fx.Node | None]:
    w = gm.graph.get_attr(f"{target}.weight")
    return w, gm.graph.get_attr(f"{target}.bias") if mod.bias is not None else None


def functionalize(gm: fx.GraphModule) -> int:
    """Rewrite module-form conv/linear/embedding nodes as ``get_attr`` weights feeding
    ``F.conv*/F.linear/F.embedding``.

    After this every weighted op has its weight (and bias) as graph values, so quantizers can sit
    between a weight and its consumer whatever form the op was captured in. Returns the number of
    rewritten nodes.
    """
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        mod = gm.get_submodule(node.target)
        d = _BY_MODULE.get(type(mod))
        if d is None or d.kind not in WEIGHTED_KINDS | TABLE_KINDS:
            continue
        if (d.kind == "conv" and mod.padding_mode != "zeros") or (d.kind == "embedding" and mod.max_norm is not None):
            continue
        with gm.graph.inserting_before(node):
            if d.kind == "embedding":
                new = gm.graph.call_function(F.embedding, (node.args[0], gm.graph.get_attr(f"{node.target}.weight")))
            elif d.kind == "conv":
                w, b = _weight_bias(gm, node.target, mod)
                padding = mod.padding if isinstance(mod.padding, str) else tuple(mod.padding)
                new = gm.graph.call_function(
                    _conv_function(mod),
                    (node.args[0], w, b, tuple(mod.stride), padding, tuple(mod.dilation), mod.groups))
            else:
                new = gm.graph.call_function(F.linear, (node.args[0], *_weight_bias(gm, node.target, mod)))
        new.meta.update(node.meta)
        new.meta["qc.layer"] = node.target
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        count += 1
    gm.graph.lint()
    gm.recompile()
    return count


def layer_name(node: fx.Node, gm: fx.GraphModule) -> str:
    """A stable, user-facing name for a compute op: its module path when it has a weight."""
    if "qc.layer" in node.meta:
        return node.meta["qc.layer"]
    if node.op == "call_module":
        return str(node.target)
    if kind(node, gm) in WEIGHTED_KINDS | TABLE_KINDS:
        w = args_of(node, gm)["weight"]
        if isinstance(w, fx.Node) and w.op == "get_attr":
            t = str(w.target)
            return t[: -len(".weight")] if t.endswith(".weight") else t
    return node.name


def clamp_bounds(node: fx.Node, gm: fx.GraphModule) -> tuple[float | None, float | None]:
    """The (low, high) bounds a clamp-like activation applies; None means unbounded."""
    k = kind(node, gm)
    if k == "relu":
        return 0.0, None
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        return float(mod.min_val), float(mod.max_val)
    a = args_of(node, gm)
    if k == "hardtanh":
        if node.target in (F.relu6, aten.relu6.default):
            return 0.0, 6.0
        return float(a["min_val"]), float(a["max_val"])
    if k == "clamp":
        lo, hi = a["min"], a["max"]
        if isinstance(lo, fx.Node) or isinstance(hi, fx.Node):
            return None, None
        return (None if lo is None else float(lo)), (None if hi is None else float(hi))
    raise KeyError(f"{node.format_node()} is not a clamp-like activation")


@dataclass
class BatchNormView:
    """The folded view of a batch norm: its input node, the node whose value it is, and tensors."""

    input: fx.Node
    output: fx.Node
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    mean: torch.Tensor
    var: torch.Tensor
    eps: float


def batchnorm_view(node: fx.Node, gm: fx.GraphModule) -> BatchNormView | None:
    """Describe an eval-mode batch norm in any form; None if it is in training mode."""
    if node.op == "call_module":
        bn = gm.get_submodule(node.target)
        if bn.training or bn.running_mean is None:
            return None
        return BatchNormView(node.args[0], node, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps)
    a = args_of(node, gm)
    if a.get("training", False):
        return None

    def t(x: Any) -> torch.Tensor | None:
        if x is None:
            return None
        if isinstance(x, fx.Node) and x.op == "get_attr":
            return get_tensor(gm, str(x.target))
        raise ValueError("batch norm statistics are not constants")

    try:
        weight, bias, mean, var = t(a["weight"]), t(a["bias"]), t(a["running_mean"]), t(a["running_var"])
    except ValueError:
        return None
    output = node
    if node.target is aten._native_batch_norm_legit_no_training.default:
        users = [u for u in node.users if u.target is operator.getitem and u.args[1] == 0]
        if len(users) != 1 or len(node.users) != 1:
            return None
        output = users[0]
    return BatchNormView(a["input"], output, weight, bias, mean, var, float(a["eps"]))
