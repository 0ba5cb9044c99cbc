"""Quantizer numerics match ONNX QuantizeLinear/DequantizeLinear as ONNX Runtime runs them."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from qcompiler.backends import ort as ort_backend
from qcompiler.quantizers.bias import BiasQuantizer
from qcompiler.quantizers.grid import QSpec, fake_quant, params_from_range
from qcompiler.quantizers.uniform import UniformQuantizer


def _ort_qdq(x: np.ndarray, scale: float, zp: int, signed: bool) -> np.ndarray:
    dt = TensorProto.INT8 if signed else TensorProto.UINT8
    g = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
         helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])],
        "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor("s", TensorProto.FLOAT, [], [scale]), helper.make_tensor("z", dt, [], [zp])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    sess = ort_backend.session(m.SerializeToString(), level="none")
    return sess.run(None, {"x": x})[0]


@pytest.mark.parametrize("signed", [False, True])
def test_fake_quant_equals_onnx_qdq_including_ties(signed):
    torch.manual_seed(0)
    scale, zp = 0.05, (3 if signed else 128)
    x = torch.randn(4096) * 5
    ties = (torch.arange(-40, 40) + 0.5) * scale  # exact halfway points: round half to even
    x = torch.cat([x, ties]).float()
    lo, hi = (-128, 127) if signed else (0, 255)
    ours = fake_quant(x, torch.tensor(scale), torch.tensor(float(zp)), lo, hi).numpy()
    theirs = _ort_qdq(x.numpy(), scale, zp, signed)
    np.testing.assert_array_equal(ours, theirs)


def test_params_cover_the_range_and_zero_exactly():
    spec = QSpec(4, signed=False, symmetric=False)
    scale, zp = params_from_range(torch.tensor(-1.0), torch.tensor(3.0), spec)
    assert float(zp) == round(float(zp)) and 0 <= float(zp) <= 15
    assert abs(float(scale) - 4.0 / 15) < 1e-6
    # zero is representable exactly (zero padding must stay zero)
    z = fake_quant(torch.zeros(3), scale, zp, spec.qmin, spec.qmax)
    assert torch.equal(z, torch.zeros(3))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_weight_quantizer_stores_integers_in_range(bits):
    torch.manual_seed(0)
    w = torch.randn(16, 8, 3, 3)
    for symmetric in (True, False):
        q = UniformQuantizer(QSpec(bits, signed=True, symmetric=symmetric, axis=0), 16)
        q.init_from_tensor(w, "mse")
        q.mode = "quant"
        ints = q.int_repr(w)
        assert torch.equal(ints, ints.round())
        assert ints.min() >= -(2 ** (bits - 1)) and ints.max() <= 2 ** (bits - 1) - 1
        deq = (ints - q.zero_point.view(-1, 1, 1, 1)) * q.scale.view(-1, 1, 1, 1)
        torch.testing.assert_close(deq, q(w))
        if symmetric:
            assert torch.equal(q.zero_point, torch.zeros(16))


def test_mse_init_beats_minmax_at_low_bits():
    torch.manual_seed(0)
    w = torch.randn(32, 1024) ** 3  # heavy tails
    errs = {}
    for method in ("minmax", "mse"):
        q = UniformQuantizer(QSpec(3, True, False, 0), 32)
        q.init_from_tensor(w, method)
        q.mode = "quant"
        errs[method] = float((q(w) - w).pow(2).mean())
    assert errs["mse"] < 0.8 * errs["minmax"], errs


def test_bias_quantizer_uses_accumulator_grid():
    a = UniformQuantizer(QSpec(8, False, False))
    a.set_range(torch.tensor(0.0), torch.tensor(2.55))
    w = UniformQuantizer(QSpec(8, True, True, 0), 4)
    w.set_range(-torch.ones(4), torch.ones(4))
    a.mode = w.mode = "quant"
    bq = BiasQuantizer(a, w)
    b = torch.tensor([0.1234, -0.5, 3.3, 0.0])
    ints, s = bq.int_repr(b)
    assert ints.dtype == torch.int32
    torch.testing.assert_close(s, a.scale * w.scale)
    torch.testing.assert_close(bq(b), ints.float() * s)


@pytest.mark.parametrize("per_channel", [True, False])
def test_bias_quantizer_fused_function_matches_straight_through_composition(per_channel: bool):
    """One autograd node gives the values of ``clamp(round_ste(b / s)) * s`` bit for bit, and its
    gradients to the bias and to both steps (the activation's, LSQ-trained, and a trained weight
    step), also for a bias clamped at the int32 limit."""
    from qcompiler.quantizers.bias import INT32_LIMIT
    from qcompiler.quantizers.grid import round_ste

    a = UniformQuantizer(QSpec(4, False, False))
    a.set_range(torch.tensor(0.0), torch.tensor(1.5))
    w = UniformQuantizer(QSpec(4, True, True, 0 if per_channel else None), 5 if per_channel else None)
    hi = torch.linspace(0.5, 1.0, 5) if per_channel else torch.tensor(0.7)
    w.set_range(-hi, hi)
    a.mode = w.mode = "quant"
    bq = BiasQuantizer(a, w)
    b = torch.tensor([0.1234, -0.5, 3.3, 0.0, 1e9])  # the last one clamps at the int32 limit
    upstream = torch.tensor([0.3, -1.2, 0.7, 2.0, 1e-8])  # the clamped term about as large as the others
    results = []
    for fused in (True, False):
        bi = b.clone().requires_grad_(True)
        for t in (a.scale, w.scale):
            t.grad = None
            t.requires_grad_(True)
        if fused:
            out = bq(bi)
        else:
            s = bq.step().expand(5) if not per_channel else bq.step()
            out = torch.clamp(round_ste(bi / s), -INT32_LIMIT, INT32_LIMIT) * s
        (out * upstream).sum().backward()
        results.append((out.detach(), bi.grad, a.scale.grad.clone(), w.scale.grad.clone()))
    (o1, *g1), (o2, *g2) = results
    assert torch.equal(o1, o2)
    assert float(results[0][1][4]) == 0.0  # clamped: no gradient to the bias
    for x, y in zip(g1, g2, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def test_folding_a_clamp_into_quantizer_bounds_is_exact():
    """clamp(round(clip(x, a, b) / s) + z) == clamp(round(x / s) + z, round(a/s)+z, round(b/s)+z)."""
    torch.manual_seed(0)
    x = torch.randn(100000) * 4
    s, z = torch.tensor(6.0 / 15), torch.tensor(0.0)
    lhs = fake_quant(torch.clamp(x, 0, 6), s, z, 0, 15)
    hi = int(torch.round(6.0 / s)) + 0
    rhs = fake_quant(x, s, z, 0, min(15, hi))
    assert torch.equal(lhs, rhs)


def test_onnx_model_uses_opset_with_per_axis_dequantize(compiled):
    r = compiled("resnet_cifar.py", bits="w8a8")
    model = onnx.load_from_string(r.onnx_bytes)
    dq_axis = [n for n in model.graph.node if n.op_type == "DequantizeLinear"
               and any(a.name == "axis" and a.i == 0 for a in n.attribute)]
    assert len(dq_axis) >= 20  # per-channel weights (and int32 biases)
