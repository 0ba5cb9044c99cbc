"""ort_numerics: the fake-quant model computed with ONNX Runtime's integer arithmetic.

The fake-quant graph computes every requantization in float: ``round(y / s_y)`` of a float conv
output ``y``. ONNX Runtime's fused kernels compute it from the exact integer accumulator, with a
float32 multiplier, and the two part where ``y / s_y`` lies within float rounding of a tie: a flip of
one step, rare per element, but millions of elements per image at 4 bits move the top-1 of a few
images in a hundred (bench/results/recon_efficientnet_lite0_w4a4.md). :func:`integer_exact` returns a
copy of the fake-quant graph whose requantizations are computed as ORT's CPU kernels compute them
(MLAS on x86), so the two agree to the last integer:

- conv, linear (``QLinearConv``, ``QGemm``) and activation matmul (``QLinearMatMul``) followed by
  an activation quantizer (through clamp-like activations, folded into integer bounds as the
  lowering folds them): ``q = clamp(round(float32(acc + bias) * M) + z_y)`` with the exact int32
  accumulator ``acc = sum (q_x - z_x) * q_w``, ``M = float32(s_x * s_w) / s_y`` per output
  channel, round half to even, then the Clip bounds;
- an add of two quantized tensors followed by a quantizer (``QLinearAdd``, MLAS's AVX2 kernel):
  ``q = sat(round(fma(q_a, R_a, fma(q_b, R_b, F))))`` with ``R_a = s_a / s_y``,
  ``R_b = s_b / s_y``, ``F = z_y - fma(R_a, z_a, R_b z_b)``;
- a linear or activation matmul on quantized inputs whose output stays float
  (``MatMulIntegerToFloat``): ``float32(acc) * float32(s_x s_w)``, then the dequantized bias added;
- a softmax between two uint8 activation quantizers (``QLinearSoftmax``): a 256-entry float32 table
  ``T[i] = exp((i - 255 + b) s_x)``, ``b = max(0, ln(FLT_MAX / D) - 5) / s_x`` for rows of length D,
  read at ``q_x - max(q_x) + 255``; the row's float32 sum taken in order; ``q = round(T * floor(1 /
  s_y) / sum) + z_y``. Its output scale is ``1 / floor(1 / s_y)``, not ``s_y``: the fake-quant model
  then computes that bias too;
- everything else (the ops ORT runs in float between DequantizeLinear and QuantizeLinear: pad,
  mean, reshape) as the fake-quant graph computes it.

The accumulator is exact: the conv runs on the integers in float32 where every partial sum stays
below 2**24 (checked per layer from the stored weights), else in float64.
"""

from __future__ import annotations

import copy
import logging
import math

import torch
import torch.nn.functional as F
from torch import fx, nn

from qcompiler.backends.onnx_qdq import integer_bounds
from qcompiler.ir import registry

log = logging.getLogger("qcompiler.ort_numerics")

#: The ORT kernels whose arithmetic :func:`integer_exact` reproduces (MLAS, x86). Others (QLinearSoftmax,
#: MatMulIntegerToFloat with a separate bias Add, QLinearConcat, ...) round in ways it does not model.
EMULATED = frozenset({"QLinearConv", "NhwcQLinearConv", "QGemm", "QLinearMatMul", "QLinearAdd", "QLinearSoftmax",
                      "MatMulIntegerToFloat"})
EXACT_FLOAT32 = 2**24  # integers up to this magnitude, and all partial sums below it, are exact in float32


def _fma32(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """float32 fused multiply-add ``a * b + c`` with one rounding (the product is exact in float64)."""
    return (a.double() * b.double() + c.double()).float()


class _Requant(nn.Module):
    """The output side every integer kernel shares: float32 value, round half to even, zero point,
    saturation to the container, the Clip bounds, and the DequantizeLinear that follows."""

    def __init__(self, out_q: nn.Module, lo: int, hi: int) -> None:
        super().__init__()
        self.register_buffer("s_y", out_q.scale.detach().float().reshape(()).clone())
        self.z_y = int(round(float(out_q.zero_point)))
        self.cmin, self.cmax = (-128, 127) if out_q.spec.signed else (0, 255)
        self.lo, self.hi = lo, hi

    def finish(self, q: torch.Tensor) -> torch.Tensor:
        """Rounded output integers ``q`` (zero point included) to the dequantized output: saturated
        to the container, clipped to the bounds, dequantized."""
        return (q.clamp(self.cmin, self.cmax).clamp(self.lo, self.hi) - self.z_y) * self.s_y


def _scale(q: nn.Module) -> torch.Tensor:
    return q.scale.detach().float().reshape(()).clone()


def _steps(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The integers ``q_x - z_x`` behind a dequantized activation ``x = (q_x - z_x) * s_x``."""
    return torch.round(x / s)


class IntegerProduct(nn.Module):
    """The exact integer accumulator of a conv / linear / activation matmul on quantized inputs."""

    def __init__(self, kind: str, call: dict, in_q: nn.Module, w_q: nn.Module | None = None,
                 weight: torch.Tensor | None = None, other_q: nn.Module | None = None) -> None:
        super().__init__()
        self.kind, self.call = kind, call
        self.register_buffer("s_x", _scale(in_q))
        self.register_buffer("s_other", None if other_q is None else _scale(other_q))
        if w_q is not None:
            w_int = w_q.int_repr(weight.detach().float())
            self.register_buffer("w_int", w_int)
            self.register_buffer("s_w", w_q.stored_scale().detach().float())
            bound = float(max(abs(in_q.qmin - in_q.zero_point), abs(in_q.qmax - in_q.zero_point))) * \
                float(w_int.abs().reshape(w_int.shape[0], -1).sum(1).max())
            self.dtype = torch.float32 if bound < EXACT_FLOAT32 else torch.float64
        else:
            self.register_buffer("s_w", self.s_other)
            self.dtype = torch.float64

    def channel_shape(self, acc: torch.Tensor) -> list[int]:
        """The broadcast shape of a per-output-channel vector over ``acc``."""
        shape = [1] * acc.dim()
        shape[1 if self.kind == "conv" else -1] = -1
        return shape

    def forward(self, x: torch.Tensor, other: torch.Tensor | None = None) -> torch.Tensor:
        k = _steps(x, self.s_x).to(self.dtype)
        if self.kind == "conv":
            acc = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[k.dim() - 2](k, self.w_int.to(self.dtype), None,
                                                                         **self.call)
        elif self.kind == "linear":
            acc = F.linear(k, self.w_int.to(self.dtype))
        else:
            acc = torch.matmul(k, _steps(other, self.s_other).to(self.dtype))
        return acc.double()


class QLinearKernel(_Requant):
    """conv / linear / activation matmul with integer accumulation and MLAS requantization."""

    def __init__(self, kind: str, call: dict, in_q: nn.Module, out_q: nn.Module, lo: int, hi: int,
                 w_q: nn.Module | None = None, weight: torch.Tensor | None = None, b_q: nn.Module | None = None,
                 bias: torch.Tensor | None = None, other_q: nn.Module | None = None) -> None:
        super().__init__(out_q, lo, hi)
        self.product = IntegerProduct(kind, call, in_q, w_q, weight, other_q)
        # float32, as ORT computes its output scales
        self.register_buffer("mult", (self.product.s_x * self.product.s_w) / self.s_y)
        self.register_buffer("b_int", None if b_q is None else b_q.int_repr(bias.detach().float())[0].double())

    def forward(self, x: torch.Tensor, other: torch.Tensor | None = None) -> torch.Tensor:
        acc = self.product(x, other)
        shape = self.product.channel_shape(acc)
        if self.b_int is not None:
            acc = acc + self.b_int.reshape(shape)
        mult = self.mult.reshape(shape) if self.mult.dim() else self.mult
        v = (acc.float() * mult).clamp(self.cmin - self.z_y, self.cmax - self.z_y)
        return self.finish(torch.round(v) + self.z_y)


class IntegerToFloatKernel(nn.Module):
    """MatMulIntegerToFloat: the exact accumulator times the float32 scale ``s_x * s_w``, plus the
    dequantized float32 bias (a separate Add)."""

    def __init__(self, kind: str, in_q: nn.Module, w_q: nn.Module | None = None, weight: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None, other_q: nn.Module | None = None) -> None:
        super().__init__()
        self.product = IntegerProduct(kind, {}, in_q, w_q, weight, other_q)
        self.register_buffer("scale", self.product.s_x * self.product.s_w)
        self.register_buffer("bias", None if bias is None else bias.detach().float())

    def forward(self, x: torch.Tensor, other: torch.Tensor | None = None) -> torch.Tensor:
        acc = self.product(x, other)
        shape = self.product.channel_shape(acc)
        y = acc.float() * (self.scale.reshape(shape) if self.scale.dim() else self.scale)
        return y if self.bias is None else y + self.bias.reshape(shape)


class QLinearAddKernel(_Requant):
    """QLinearAdd as MLAS's AVX2 kernel computes it: two fused multiply-adds in float32."""

    def __init__(self, a_q: nn.Module, b_q: nn.Module, out_q: nn.Module, lo: int, hi: int) -> None:
        super().__init__(out_q, lo, hi)
        s_a, s_b = _scale(a_q), _scale(b_q)
        self.register_buffer("s_a", s_a)
        self.register_buffer("s_b", s_b)
        self.z_a, self.z_b = (int(round(float(q.zero_point))) for q in (a_q, b_q))
        r_a, r_b = s_a / self.s_y, s_b / self.s_y
        # ORT's build contracts ``R_a z_a + R_b z_b`` into one fused multiply-add (matched against ORT's
        # QLinearAdd on every pair of uint8 inputs for 12 random scale sets: tests/test_ort_numerics.py).
        z_a, z_b = torch.tensor(float(self.z_a)), torch.tensor(float(self.z_b))
        fixed = torch.tensor(float(self.z_y), dtype=torch.float32) - _fma32(r_a, z_a, r_b * z_b)
        self.register_buffer("r_a", r_a)
        self.register_buffer("r_b", r_b)
        self.register_buffer("fixed", fixed)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        qa = _steps(a, self.s_a) + self.z_a
        qb = _steps(b, self.s_b) + self.z_b
        return self.finish(torch.round(_fma32(qa, self.r_a, _fma32(qb, self.r_b, self.fixed))))


class QLinearSoftmaxKernel(_Requant):
    """QLinearSoftmax (uint8) as ONNX Runtime's CPU kernel computes it (module docstring)."""

    def __init__(self, in_q: nn.Module, out_q: nn.Module, lo: int, hi: int, dim: int) -> None:
        super().__init__(out_q, lo, hi)
        self.register_buffer("s_x", _scale(in_q))
        self.z_x = int(round(float(in_q.zero_point)))
        self.y_mult = float(torch.floor(torch.tensor(1.0, dtype=torch.float32) / self.s_y))
        self.dim = dim

    def table(self, length: int) -> torch.Tensor:
        s_x = float(self.s_x)
        shift = max(0.0, math.log(float(torch.finfo(torch.float32).max) / length) - 5.0) / s_x
        i = torch.arange(256, dtype=torch.float64)
        return torch.exp((i - 255 + shift) * s_x).float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = (_steps(x, self.s_x) + self.z_x).movedim(self.dim, -1)
        t = self.table(q.shape[-1])
        v = t[(q - q.amax(-1, keepdim=True) + 255).long()]
        total = torch.zeros_like(v[..., 0])
        for j in range(v.shape[-1]):  # ORT sums each row in order, in float32
            total = total + v[..., j]
        y = torch.round((v * self.y_mult) / total.unsqueeze(-1)) + self.z_y
        return self.finish(y.clamp(max=255)).movedim(-1, self.dim)


def _softmax_dim(node: fx.Node, gm: fx.GraphModule) -> int:
    if node.op == "call_module":
        return gm.get_submodule(str(node.target)).dim
    return node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", -1)


def _act_quantizer(gm: fx.GraphModule, node: object) -> nn.Module | None:
    """The activation quantizer whose values ``node`` holds (through view ops, across which ORT moves
    the DequantizeLinear), or None."""
    node = registry.view_source(node, gm)
    if isinstance(node, fx.Node) and node.meta.get("qc.quantizer") == "act":
        # A quantizer already fused into a kernel keeps its module in the meta: it still defines the grid.
        return node.meta.get("qc.fused_quantizer") or gm.get_submodule(str(node.target))
    return None


def _weight(gm: fx.GraphModule, w: object) -> tuple[nn.Module | None, torch.Tensor | None]:
    """The weight quantizer at ``w`` and the parameter it reads; (None, None) if ``w`` is no quantized weight."""
    if not (isinstance(w, fx.Node) and w.meta.get("qc.quantizer") == "weight"):
        return None, None
    return gm.get_submodule(str(w.target)), registry.get_tensor(gm, str(w.args[0].target))


def _install(gm: fx.GraphModule, node: fx.Node, name: str, kernel: nn.Module, inputs: tuple) -> fx.Node:
    """Put ``kernel`` (reading ``inputs``) in ``node``'s place; returns its node."""
    gm.add_submodule(name, kernel)
    with gm.graph.inserting_before(node):
        new = gm.graph.call_module(name, inputs)
    node.replace_all_uses_with(new)
    return new


def _kernel_for(gm: fx.GraphModule, src: fx.Node, out_q: nn.Module, lo: int, hi: int
                ) -> tuple[nn.Module, tuple] | None:
    """The integer kernel ORT fuses ``src`` and its output quantizer into, with its inputs; or None."""
    kind = registry.kind(src, gm)
    if kind not in ("conv", "linear", "matmul", "add", "softmax") or len(src.users) != 1:
        return None
    a = registry.args_of(src, gm)
    if kind == "softmax":
        in_q = _act_quantizer(gm, a["input"])
        if in_q is None or in_q.spec.signed or out_q.spec.signed or lo > hi:
            return None
        return QLinearSoftmaxKernel(in_q, out_q, lo, hi, _softmax_dim(src, gm)), (a["input"],)
    if kind == "add":
        qa, qb = _act_quantizer(gm, a["input"]), _act_quantizer(gm, a["other"])
        if qa is None or qb is None or a.get("alpha", 1) != 1:
            return None
        return QLinearAddKernel(qa, qb, out_q, lo, hi), (a["input"], a["other"])
    in_q = _act_quantizer(gm, a["input"])
    if in_q is None:
        return None
    if kind == "matmul":
        other_q = _act_quantizer(gm, a["other"])
        if other_q is None:
            return None
        return QLinearKernel("matmul", {}, in_q, out_q, lo, hi, other_q=other_q), (a["input"], a["other"])
    w_q, weight = _weight(gm, a["weight"])
    b = a.get("bias")
    if w_q is None or (b is not None and not (isinstance(b, fx.Node) and b.meta.get("qc.quantizer") == "bias")):
        return None
    call = {}
    if kind == "conv":
        call = {k: a[k] for k in ("stride", "padding", "dilation", "groups")}
    b_q = bias = None
    if b is not None:
        b_q, bias = gm.get_submodule(str(b.target)), registry.get_tensor(gm, str(b.args[0].target))
    return QLinearKernel(kind, call, in_q, out_q, lo, hi, w_q, weight, b_q, bias), (a["input"],)


def _float_output_kernel(gm: fx.GraphModule, node: fx.Node) -> tuple[nn.Module, tuple] | None:
    """The MatMulIntegerToFloat kernel of a linear / matmul whose inputs are quantized and whose
    output is read in float; or None."""
    kind = registry.kind(node, gm)
    if kind not in ("linear", "matmul") or any(u.meta.get("qc.quantizer") == "act" for u in node.users):
        return None
    a = registry.args_of(node, gm)
    in_q = _act_quantizer(gm, a["input"])
    if in_q is None:
        return None
    if kind == "matmul":
        other_q = _act_quantizer(gm, a["other"])
        return None if other_q is None else (IntegerToFloatKernel("matmul", in_q, other_q=other_q),
                                             (a["input"], a["other"]))
    w_q, weight = _weight(gm, a["weight"])
    if w_q is None:
        return None
    b, bias = a.get("bias"), None
    if isinstance(b, fx.Node) and b.meta.get("qc.quantizer") == "bias":
        bias = gm.get_submodule(str(b.target))(registry.get_tensor(gm, str(b.args[0].target)))
    elif isinstance(b, fx.Node) and b.op == "get_attr":
        bias = registry.get_tensor(gm, str(b.target))
    elif b is not None:
        return None
    return IntegerToFloatKernel("linear", in_q, w_q, weight, bias), (a["input"],)


@torch.no_grad()
def integer_exact(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of the fake-quant graph ``gm`` whose requantizations compute as ONNX Runtime's kernels.

    Rule: every activation quantizer fed (through clamps it alone reads) by a conv, linear, matmul,
    add or softmax whose inputs are quantized becomes one integer kernel module; a linear or matmul
    on quantized inputs whose output is not requantized becomes ``IntegerToFloatKernel``; the rest
    is unchanged.
    """
    gm = copy.deepcopy(gm)
    fused = 0
    for node in list(gm.graph.nodes):
        if node.meta.get("qc.quantizer") != "act":
            continue
        out_q = _act_quantizer(gm, node)
        src, lo, hi, _ = integer_bounds(gm, node, out_q)
        made = _kernel_for(gm, src, out_q, lo, hi) if isinstance(src, fx.Node) else None
        if made is None:
            continue
        new = _install(gm, node, f"{node.target}_int", *made)
        new.meta.update(node.meta)
        new.meta["qc.fused_quantizer"] = out_q
        fused += 1
    gm.graph.eliminate_dead_code()
    for node in list(gm.graph.nodes):
        made = _float_output_kernel(gm, node)
        if made is None:
            continue
        _install(gm, node, f"qc_int_to_float_{node.name}", *made)
        gm.graph.erase_node(node)
        fused += 1
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    gm.meta["qc.integer_kernels"] = fused
    log.info("integer-exact model: %d requantizations computed as ORT's kernels", fused)
    return gm
