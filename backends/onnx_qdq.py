"""onnx_qdq: lower the calibrated fake-quant program to an ONNX QDQ model, and the onnx-int8 target.

Rule: the deployed graph computes exactly what the fake-quant graph computes.

- A weight quantizer becomes an integer initializer (int8, values already inside the low-bit
  range) feeding ``DequantizeLinear`` (per output channel on axis 0).
- The bias of a conv/linear whose input and weight are quantized becomes an int32 initializer with
  scale ``s_in * s_w`` feeding ``DequantizeLinear``, as ONNX Runtime's integer kernels expect.
- An activation quantizer becomes ``QuantizeLinear -> [Clip(int bounds)] -> DequantizeLinear``
  into uint8. The Clip keeps a sub-8-bit range (e.g. [0, 15]) that the 8-bit container would lose.
- A clamp-like activation (relu, relu6, clamp) whose only user is a quantizer is folded into the
  quantizer's integer bounds: ``clamp(round(clip(x, a, b) / s) + z, lo, hi)`` equals
  ``clamp(round(x / s) + z, max(lo, round(a / s) + z), min(hi, round(b / s) + z))`` because
  rounding is monotone. The conv then feeds QuantizeLinear directly and fuses into an integer kernel.

- A linear layer whose output is not requantized (its consumer computes in float) becomes
  ``MatMul(x, W^T) + b`` with ``W^T`` dequantized per column and ``b`` a float initializer holding
  the int32 bias's dequantized values (so ORT can fold the Add into the LayerNorm or GELU after it),
  batched over the rows' leading dimensions when ``linear_forms`` had flattened them (on a leading
  unit dimension otherwise).
  ONNX Runtime runs that as ``MatMulIntegerToFloat`` (integer products, float output), while a
  ``Gemm`` without an output QuantizeLinear (and a 2-D MatMul + Add, which it fuses into one)
  stays a float Gemm.

The graph is exported with ``torch.onnx.export`` (dynamo), the ``qc::`` ops translated to ONNX
by ``qdq_modules.TRANSLATIONS`` (and GELU in the operand order ONNX Runtime fuses into one kernel);
every other op keeps its standard translation.
"""

from __future__ import annotations

import copy
import io
import logging
import math
import re

import onnx
import torch
from torch import fx, nn

from qcompiler.backends.qdq_modules import TRANSLATIONS, FloatConstant, FloatFakeQuant, QdqActivation, QdqConstant
from qcompiler.config import QuantConfig, TargetOptions
from qcompiler.errors import LoweringError, PreconditionError
from qcompiler.ir import registry
from qcompiler.ir.annotation import Annotations, annotate_by_placement
from qcompiler.ir.passes import Pass, PassResult, require_graph
from qcompiler.ir.program import Lowered, Program, export_args
from qcompiler.ir.target import Placement
from qcompiler.quantizers.grid import QSpec
from qcompiler.quantizers.uniform import UniformQuantizer

log = logging.getLogger("qcompiler.onnx_qdq")

OPSET = 18

# ------------------------------------------------------------------ the lowering pass


def _quantizer(gm: fx.GraphModule, node: object, which: str) -> UniformQuantizer | None:
    if isinstance(node, fx.Node) and node.meta.get("qc.quantizer") == which:
        q = gm.get_submodule(node.target)
        return q if isinstance(q, UniformQuantizer) else None
    return None


def _delete_attr(gm: fx.GraphModule, target: str) -> None:
    *path, leaf = target.split(".")
    mod = gm.get_submodule(".".join(path)) if path else gm
    if hasattr(mod, leaf):
        delattr(mod, leaf)


def _to_constant(gm: fx.GraphModule, qnode: fx.Node, const: nn.Module) -> None:
    """Replace a parameter's quantizer node by the output of a deployed constant module."""
    attr = qnode.args[0]
    name = f"{qnode.target}_int"
    gm.add_submodule(name, const)
    with gm.graph.inserting_before(qnode):
        new = gm.graph.call_module(name, ())
    qnode.replace_all_uses_with(new)
    gm.graph.erase_node(qnode)
    if not attr.users:
        gm.graph.erase_node(attr)
        if not any(n.op == "get_attr" and n.target == attr.target for n in gm.graph.nodes):  # a shared module
            _delete_attr(gm, str(attr.target))


def build_deploy_graph(program: Program, float_ops: bool = False) -> tuple[fx.GraphModule, dict]:
    """A copy of the fake-quant graph with quantizers replaced by their integer (QDQ) form; with
    ``float_ops``, by float operations computing the same values instead: parameters become float
    constants holding their fake-quantized values, activation quantizers ``FloatFakeQuant``."""
    gm = copy.deepcopy(program.gm)
    stats = {"int_weights": 0, "int_biases": 0, "activations": 0, "folded_clamps": 0, "clipped": 0}
    if float_ops:
        stats["float_params"] = 0
    # Biases first: their quantizers read the (still float) weight quantizers' scales.
    for which in ("bias", "weight"):
        for node in [n for n in gm.graph.nodes if n.meta.get("qc.quantizer") == which]:
            q = gm.get_submodule(node.target)
            value = registry.get_tensor(gm, str(node.args[0].target)).detach().float()
            if float_ops:
                with torch.no_grad():
                    _to_constant(gm, node, FloatConstant(q(value)))
                stats["float_params"] += 1
                continue
            if not getattr(q, "integer_form", True):
                raise LoweringError(f"{node.name}: {type(q).__name__} has no integer form; deploy it with a target "
                                    "that simulates quantizers in float (--target onnx-fp)")
            if which == "bias":
                ints, s = q.int_repr(value)
                const = QdqConstant(ints, s, torch.zeros_like(s), 0)
            else:
                ints = q.int_repr(value).to(torch.int8 if q.spec.signed else torch.uint8)
                axis = q.spec.axis if q.spec.axis is not None else 0
                const = QdqConstant(ints, q.stored_scale(), q.stored_zero_point(), axis)
            _to_constant(gm, node, const)
            stats["int_biases" if which == "bias" else "int_weights"] += 1
    for node in list(gm.graph.nodes):
        aq = _quantizer(gm, node, "act")
        if aq is None:
            continue
        if not aq.integer_form:  # non-uniform levels: only their own float operations compute them
            if not float_ops:
                raise LoweringError(f"{node.name}: {type(aq).__name__} has no integer form; deploy it with a "
                                    "target that simulates quantizers in float (--target onnx-fp)")
            name = f"{node.target}_float"
            gm.add_submodule(name, aq.float_module())
            node.target = name
            stats["activations"] += 1
            continue
        src, lo, hi, clamps = integer_bounds(gm, node, aq)
        node.args = (src,) + tuple(node.args[1:])
        for clamp in clamps:  # outermost first: each is the only user of the next
            gm.graph.erase_node(clamp)
        stats["folded_clamps"] += len(clamps)
        if lo > hi:
            raise LoweringError(f"activation quantizer {node.name}: its clamp leaves an empty integer range")
        stats["clipped"] += int((lo, hi) not in ((0, 255), (-128, 127)))
        new = (FloatFakeQuant if float_ops else QdqActivation)(aq.scale, aq.zero_point, lo, hi, aq.spec.signed)
        name = f"{node.target}_qdq"
        gm.add_submodule(name, new)
        node.target = name
        stats["activations"] += 1
    if not float_ops:
        stats["float_output_linears"] = sum(_as_matmul(gm, n) for n in list(gm.graph.nodes))
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm, stats


def _as_matmul(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Rewrite an integer linear layer whose output is not requantized as ``matmul(x, W^T) + b``."""
    if registry.kind(node, gm) != "linear" or any(u.meta.get("qc.quantizer") == "act" for u in node.users):
        return False
    a = registry.args_of(node, gm)
    w, b = a["weight"], a.get("bias")
    if not (isinstance(w, fx.Node) and w.op == "call_module" and isinstance(gm.get_submodule(w.target), QdqConstant)):
        return False
    x, result = a["input"], node
    rows = registry.rows_of(x)
    if rows is not None and len(node.users) == 1 and next(iter(node.users)).target is torch.unflatten:
        x, result = rows, next(iter(node.users))  # a batched MatMul keeps the rows' shape
    wq = gm.get_submodule(w.target)
    name = f"{w.target}_t"
    gm.add_submodule(name, QdqConstant(wq.q.t().contiguous(), wq.scale, wq.zero_point, 1))
    flat = x is a["input"] and b is not None  # 2-D MatMul + Add: ORT would fuse them into a float Gemm
    with gm.graph.inserting_before(node):
        if isinstance(b, fx.Node) and b.op == "call_module" and isinstance(gm.get_submodule(b.target), QdqConstant):
            with torch.no_grad():  # added in float: its dequantized values, which ORT folds into the next kernel
                gm.add_submodule(f"{b.target}_float", FloatConstant(gm.get_submodule(b.target)()))
            b = gm.graph.call_module(f"{b.target}_float", ())
        if flat:
            x = gm.graph.call_function(torch.unsqueeze, (x, 0))
        out = gm.graph.call_function(torch.matmul, (x, gm.graph.call_module(name, ())))
        if flat:
            out = gm.graph.call_function(torch.squeeze, (out, 0))
        if b is not None:
            out = gm.graph.call_function(torch.add, (out, b))
    out.meta.update(node.meta)
    result.replace_all_uses_with(out)
    if result is not node:
        gm.graph.erase_node(result)
    gm.graph.erase_node(node)
    return True


def integer_bounds(gm: fx.GraphModule, node: fx.Node, q: UniformQuantizer
                   ) -> tuple[object, int, int, list[fx.Node]]:
    """(source, lo, hi, clamps): what activation quantizer ``node`` reads once the clamp-like
    activations that only it reads are folded into its integer bounds, and those clamps (outermost
    first). ``clamp(round(clip(x, a, b) / s) + z, lo, hi)`` equals ``clamp(round(x / s) + z,
    max(lo, round(a / s) + z), min(hi, round(b / s) + z))`` because rounding is monotone."""
    lo, hi = int(q.qmin), int(q.qmax)
    scale, zp = float(q.scale), int(round(float(q.zero_point)))
    src, clamps = node.args[0], []
    while isinstance(src, fx.Node) and registry.kind(src, gm) in registry.CLAMP_KINDS and len(src.users) == 1:
        a, b = registry.clamp_bounds(src, gm)
        if a is not None:
            lo = max(lo, _round_half_even(a / scale) + zp)
        if b is not None:
            hi = min(hi, _round_half_even(b / scale) + zp)
        clamps.append(src)
        src = registry.input_of(src)
    return src, lo, hi, clamps


def _round_half_even(x: float) -> int:
    return int(torch.round(torch.tensor(x, dtype=torch.float32)).item()) if math.isfinite(x) else int(x)


def export_onnx(module: nn.Module, example_inputs: tuple | dict, translations: dict | None = None,
                dims: dict | None = None) -> bytes:
    """Export ``module`` to ONNX bytes with a dynamic batch dimension on every tensor input (and the
    dimensions ``dims`` names: see ``export_args``)."""
    args, kwargs, dyn = export_args(example_inputs, module, dims)
    onnx_program = torch.onnx.export(module, args, kwargs=kwargs or None, dynamo=True, dynamic_shapes=dyn,
                                     custom_translation_table=translations, opset_version=OPSET,
                                     optimize=True, verbose=False)
    model = onnx_program.model_proto
    strip_metadata(model)
    buf = io.BytesIO()
    onnx.save_model(model, buf)
    return buf.getvalue()


_TRANSLATING = re.compile(r"translating node %(\w+) .*?target=(?:torch\.ops\.)?([\w.]+)")


def _op_key(name: str) -> str:
    """An op's name without its namespace, overload, leading underscores and numeric suffix."""
    parts = name.split(".")
    base = parts[1] if len(parts) == 3 else parts[-1]
    return re.sub(r"_\d+$", "", base.strip("_"))


def export_failure(exc: BaseException, gm: fx.GraphModule) -> str:
    """One line saying what broke an ONNX export: the op the exporter could not translate, the module
    it came from, and the innermost reason.

    The exporter names a node of its own re-traced graph; the node of ``gm`` it came from is the
    first one whose name or target has the same op key (``_linalg_eigh`` and ``linalg_eigh_1`` have
    ``linalg_eigh``), and its module is the innermost entry of that node's ``nn_module_stack``.
    """
    chain: list[BaseException] = []
    e: BaseException | None = exc
    while e is not None and len(chain) < 16:
        chain.append(e)
        e = e.__cause__ or e.__context__
    innermost = chain[-1]
    lines = str(innermost).strip().splitlines()
    reason = f"{type(innermost).__name__}: {lines[0] if lines else ''}"
    found = next((m for m in (_TRANSLATING.search(str(x)) for x in chain) if m), None)
    if found is None:
        return reason
    name, op = found.groups()
    keys = {_op_key(name), _op_key(op)}
    for node in gm.graph.nodes:
        target = getattr(node.target, "__name__", str(node.target))
        if node.op == "call_function" and keys & {_op_key(node.name), _op_key(str(node.target)), _op_key(target)}:
            stack = list((node.meta.get("nn_module_stack") or {}).values())
            if not stack:
                return f"{op} (node {node.name}) could not be translated: {reason}"
            path, cls = stack[-1]
            cls = getattr(cls, "__name__", str(cls).rsplit(".", 1)[-1])
            return f"{op} (node {node.name}, module {path or '(root)'} of type {cls}) could not be translated: {reason}"
    return f"{op} could not be translated: {reason}"


def strip_metadata(model: onnx.ModelProto) -> None:
    """Drop the exporter's per-node debug metadata (stack traces, fx nodes): a third of a small model."""
    for node in model.graph.node:
        del node.metadata_props[:]
    for vi in model.graph.value_info:
        del vi.metadata_props[:]


class LowerOnnxQdq(Pass):
    """Lower the fake-quant program to an ONNX QDQ model (``program.lowered``)."""

    name = "lower_onnx_qdq"

    def requires(self, program: Program) -> None:
        require_graph(program, self.name)
        if not program.state.calibrated:
            raise PreconditionError("lower_onnx_qdq needs calibrated quantizers: run calibrate first")

    float_ops = False  # LowerOnnxFp: quantizers as float operations computing the fake-quant values

    def run(self, program: Program) -> PassResult:
        deploy, stats = build_deploy_graph(program, self.float_ops)
        try:
            data = export_onnx(deploy, program.example_inputs, TRANSLATIONS, program.dynamic_dims)
        except Exception as exc:  # noqa: BLE001 - name what broke the export
            raise LoweringError(f"ONNX export of {program.source} failed: {export_failure(exc, deploy)}") from exc
        program.lowered = Lowered(onnx_bytes=data, deploy_gm=deploy)
        stats["bytes"] = len(data)
        return PassResult(True, stats)

    def ensures(self, program: Program) -> None:
        model = onnx.load_from_string(program.lowered.onnx_bytes)
        types = {n.op_type for n in model.graph.node}
        markers = {"Round", "Gather"} if self.float_ops else {"DequantizeLinear"}
        if self.float_ops and not any(True for _ in program.quantizer_nodes("act")):
            return  # weights only, in float: nothing but the weights' values shows the quantization
        if program.state.quantized_layers and not markers & types:
            raise LoweringError(f"the exported model has no {' or '.join(sorted(markers))}: quantization was lost "
                                "in export")


class OnnxInt8Target:
    """ONNX QDQ for ONNX Runtime's integer kernels: uint8 activations, int8 weights.

    u8 activations x s8 weights are ORT's fast x86 path (s8 activations ran slower than float).
    On x86 CPUs without VNNI that path sums pairs of u8 x s8 products in saturating int16
    (VPMADDUBSW): 255 * 127 * 2 overflows and the deployed model silently computes something else.
    With ``reduce_range`` (the default) weights use at most 7 bits, [-64, 63], which never
    saturates; turn it off only for models deployed on VNNI CPUs (the agreement check catches the
    saturation when it happens on the compiling machine). Depthwise convs run on a direct int32
    kernel, not the pairwise int16 one: their 8 bits stay exact.
    """

    name = "onnx-int8"

    def __init__(self, options: TargetOptions | None = None) -> None:
        self.options = options or TargetOptions()

    def placement(self) -> Placement:
        return Placement(act_signed=False, weight_signed=True, max_weight_bits=7 if self.options.reduce_range else 8,
                         max_weight_bits_depthwise=8, float_output_kinds=frozenset({"linear", "matmul"}))

    def annotate(self, gm: fx.GraphModule, quant: QuantConfig) -> Annotations:
        """Integer-kernel placement (``annotate_by_placement``) with this target's weight grids."""
        return annotate_by_placement(gm, quant, self.placement(), self.weight_spec)

    def weight_spec(self, bits: int, depthwise: bool, quant: QuantConfig) -> tuple[QSpec, list[str]]:
        """The weight grid of a layer that asks for ``bits``.

        Rule: at most the width the kernels compute exactly (``narrowed`` otherwise). QLinearConv
        takes only zero weight zero points with per-channel weights, so asymmetric weights (the
        default) are stored centered (q - z, one more bit) where that fits, else stay symmetric
        (``kept symmetric``, noted when asymmetric was asked for). Grids of at most ``w_midrise``
        bits sit half a step off zero when the wider integers still fit: centered ones with
        half-integer zero points (two more bits), symmetric ones on the zero-free midrise grid.
        """
        place = self.placement()
        max_bits = place.max_weight_bits_depthwise if depthwise else place.max_weight_bits
        w_bits = min(bits, max_bits)
        notes = ["narrowed"] if w_bits < bits else []
        symmetric, centered = quant.w_symmetric is True, False
        if not symmetric and place.weight_zero_point_zero:
            centered = place.weight_signed and w_bits + 1 <= max_bits
            symmetric = not centered
            if symmetric and quant.w_symmetric is False:
                notes.append("kept symmetric")
        halves = centered and w_bits <= quant.w_midrise and w_bits + 2 <= max_bits
        midrise = symmetric and w_bits <= quant.w_midrise and place.weight_signed and w_bits + 1 <= max_bits
        spec = QSpec(w_bits, place.weight_signed, symmetric, 0 if quant.per_channel else None, midrise, centered,
                     halves)
        return spec, notes

    def lowering_passes(self) -> list[Pass]:
        from qcompiler.backends.ort import VerifyOrt

        return [LowerOnnxQdq(), VerifyOrt(self.options)]
