"""The fake-quant model's integer arithmetic is ONNX Runtime's, to the last integer."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import qcompiler
from qcompiler.backends.ort_numerics import QLinearAddKernel, QLinearSoftmaxKernel
from qcompiler.quantizers.uniform import QSpec, UniformQuantizer

from conftest import assert_ort_equals_fake_quant


def _quantizer(scale: float, zp: int) -> UniformQuantizer:
    q = UniformQuantizer(QSpec(8, False, False))
    q.scale.data = torch.tensor(scale)
    q.zero_point.data = torch.tensor(float(zp))
    return q


def _ort_qlinear_add(sa, za, sb, zb, sc, zc) -> ort.InferenceSession:
    inits = [numpy_helper.from_array(np.array(v, dtype=np.float32 if isinstance(v, float) else np.uint8), n)
             for n, v in (("sa", sa), ("za", za), ("sb", sb), ("zb", zb), ("sc", sc), ("zc", zc))]
    node = helper.make_node("QLinearAdd", ["a", "sa", "za", "b", "sb", "zb", "sc", "zc"], ["c"],
                            domain="com.microsoft")
    io = [helper.make_tensor_value_info(n, TensorProto.UINT8, [None]) for n in "abc"]
    graph = helper.make_graph([node], "add", io[:2], io[2:], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                    helper.make_opsetid("com.microsoft", 1)])
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def test_qlinear_add_matches_ort_on_every_pair_of_inputs():
    a = torch.arange(256.0).repeat_interleave(256)
    b = torch.arange(256.0).repeat(256)
    rng = np.random.default_rng(0)
    plain_misses = 0
    for _ in range(12):
        sa, sb, sc = (float(np.float32(rng.uniform(0.01, 0.2))) for _ in range(3))
        za, zb, zc = (int(rng.integers(0, 256)) for _ in range(3))
        got = _ort_qlinear_add(sa, za, sb, zb, sc, zc).run(
            None, {"a": a.numpy().astype(np.uint8), "b": b.numpy().astype(np.uint8)})[0]
        qa, qb, qc = _quantizer(sa, za), _quantizer(sb, zb), _quantizer(sc, zc)
        kernel = QLinearAddKernel(qa, qb, qc, 0, 255)
        out = kernel((a - za) * qa.scale.detach(), (b - zb) * qb.scale.detach())
        assert torch.equal(torch.round(out / qc.scale.detach()) + zc, torch.from_numpy(got.astype(np.float32)))
        # the float-requantizing fake-quant add, ((a - za) sa + (b - zb) sb) / sc rounded, misses some ties
        plain = torch.round(((a - za) * sa + (b - zb) * sb) / sc) + zc
        plain_misses += int((plain.clamp(0, 255) != torch.from_numpy(got.astype(np.float32))).sum())
    assert plain_misses > 0


def _ort_qlinear_softmax(sx, zx, sy, zy) -> ort.InferenceSession:
    inits = [numpy_helper.from_array(np.array(v, dtype=np.float32 if isinstance(v, float) else np.uint8), n)
             for n, v in (("sx", sx), ("zx", zx), ("sy", sy), ("zy", zy))]
    node = helper.make_node("QLinearSoftmax", ["x", "sx", "zx", "sy", "zy"], ["y"], domain="com.microsoft",
                            axis=-1, opset=13)
    io = [helper.make_tensor_value_info(n, TensorProto.UINT8, [None, 24]) for n in "xy"]
    graph = helper.make_graph([node], "softmax", io[:1], io[1:], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                    helper.make_opsetid("com.microsoft", 1)])
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def test_qlinear_softmax_matches_ort():
    rng = np.random.default_rng(0)
    plain_misses = 0
    for _ in range(12):
        sx, sy = float(np.float32(rng.uniform(0.02, 0.3))), float(np.float32(rng.uniform(0.5, 1.0) / 255))
        zx, zy = int(rng.integers(0, 256)), int(rng.integers(0, 3))
        x = torch.from_numpy(rng.integers(0, 256, (512, 24)).astype(np.float32))
        got = torch.from_numpy(_ort_qlinear_softmax(sx, zx, sy, zy).run(None, {"x": x.numpy().astype(np.uint8)})[0]
                               .astype(np.float32))
        qx, qy = _quantizer(sx, zx), _quantizer(sy, zy)
        out = QLinearSoftmaxKernel(qx, qy, 0, 255, -1)((x - zx) * qx.scale.detach())
        assert torch.equal(torch.round(out / qy.scale.detach()) + zy, got)
        # the fake-quant softmax, round(softmax(x) / sy) + zy, differs (ORT's output step is 1 / floor(1 / sy))
        plain = (torch.round(torch.softmax((x - zx) * sx, -1) / sy) + zy).clamp(0, 255)
        plain_misses += int((plain != got).sum())
    assert plain_misses > 0


class Wide(nn.Module):
    """Convs (one depthwise), a residual add and a classifier, at 8 and 4 bits."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.c1 = nn.Conv2d(3, 64, 3, padding=1)
        self.c2 = nn.Conv2d(64, 64, 3, padding=1)
        self.c3 = nn.Conv2d(64, 64, 3, padding=1, groups=64)
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.c1(x))
        y = torch.relu(self.c2(y)) + y
        y = torch.nn.functional.relu6(self.c3(y))
        return self.fc(y.mean((2, 3)))


@pytest.mark.parametrize("bits", ["w8a8", "w4a4"])
def test_integer_exact_model_equals_ort(bits):
    """(Where float requantization parts from ORT, on EfficientNet-Lite0: tests/test_pipeline.py.)"""
    torch.manual_seed(0)
    calib = [(torch.randn(32, 3, 16, 16),) for _ in range(4)]
    r = qcompiler.compile(Wide().eval(), example_inputs=(torch.randn(1, 3, 16, 16),), calib=calib, bits=bits,
                          first_last_8bit=False)
    assert r.program.lowered.integer_gm.meta["qc.integer_kernels"] == 5  # 3 convs, the add, the fc
    assert_ort_equals_fake_quant(r, (torch.randn(256, 3, 16, 16) * 2,))


class FloatOutputs(nn.Module):
    """Linear layers whose outputs feed float ops (GELU, LayerNorm with a residual), as in a transformer."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = nn.Linear(32, 64), nn.Linear(64, 32), nn.Linear(32, 10)
        self.norm = nn.LayerNorm(32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x + self.b(torch.nn.functional.gelu(self.a(x))))
        return self.c(h + self.b(torch.nn.functional.gelu(self.a(h))))


def test_float_output_linears_run_as_matmul_integer_to_float_equal_to_fake_quant():
    from qcompiler.backends import ort as ort_backend
    from qcompiler.ir import registry

    torch.manual_seed(0)
    calib = [(torch.randn(16, 8, 32),) for _ in range(4)]
    r = qcompiler.compile(FloatOutputs().eval(), example_inputs=(torch.randn(2, 8, 32),), calib=calib, bits="w8a8")
    counts = ort_backend.optimized_op_counts(r.onnx_bytes)
    assert counts["MatMulIntegerToFloat"] == 4 and counts["QGemm"] == 1, counts
    assert r.checks["integer_kernels"]["unmodelled"] == []
    assert_ort_equals_fake_quant(r, (torch.randn(16, 8, 32),))
    # the residual adds read the LayerNorm output and the input in float, not their quantized copies
    gm = r.program.gm
    for add in (n for n in gm.graph.nodes if registry.kind(n, gm) == "add"):
        assert not any(a.meta.get("qc.quantizer") == "act" for a in add.all_input_nodes), add.format_node()


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_translation_computes_gelu_and_fuses(approximate):
    """GELU's own ONNX form: ORT's fused kernel (erf form) or the formula (tanh) equal torch's GELU."""
    from qcompiler.backends import ort as ob
    from qcompiler.backends.onnx_qdq import export_onnx
    from qcompiler.backends.qdq_modules import TRANSLATIONS

    class Gelu(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return nn.functional.gelu(x * 1.5 + 0.25, approximate=approximate)

    x = torch.linspace(-8, 8, 4001).reshape(1, -1)
    data = export_onnx(Gelu(), (x,), TRANSLATIONS)
    got = torch.from_numpy(ob.session(data).run(None, {"x": x.numpy()})[0])
    assert torch.allclose(got, Gelu()(x), atol=1e-5)
    if approximate == "none":
        counts = ob.optimized_op_counts(data)
        assert not counts.get("Erf") and counts.get("BiasGelu", 0) + counts.get("Gelu", 0) == 1, counts
