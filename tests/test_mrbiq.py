"""Mr.BiQ: binary coding, the uniform variant's grid and integers, and where each form deploys."""

from __future__ import annotations

import onnx
import pytest
import torch
from test_errors import _assert_clean_failure, run_cli

import qcompiler
from qcompiler.backends import ort as ob
from qcompiler.backends.onnx_qdq import LowerOnnxQdq
from qcompiler.config import ReconConfig
from qcompiler.errors import LoweringError
from qcompiler.quantizers.grid import QSpec
from qcompiler.quantizers.mrbiq import MrBiQQuantizer, MrBiQUniformQuantizer, binary_code
from qcompiler.quantizers.uniform import UniformQuantizer


def _weight(seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(8, 4, 3, 3, generator=gen) * 0.2 + 0.03


def _calibrated(spec: QSpec, w: torch.Tensor) -> UniformQuantizer:
    q = UniformQuantizer(spec, 8 if spec.axis is not None else None)
    q.init_from_tensor(w, "mse")
    q.mode = "quant"
    return q


def test_one_bit_binary_code_is_sign_times_mean_magnitude():
    w2d = _weight().reshape(8, -1)
    alpha, codes = binary_code(w2d, 1)
    torch.testing.assert_close(alpha[:, 0], w2d.abs().mean(1))
    assert torch.equal(codes[0], torch.where(w2d >= 0, 1.0, -1.0))


def test_alternating_binary_code_improves_on_greedy_and_on_fewer_bits():
    w2d = _weight().reshape(8, -1)

    def err(k: int, rounds: int) -> float:
        alpha, codes = binary_code(w2d, k, rounds)
        return float(((alpha.T[:, :, None] * codes).sum(0) - w2d).pow(2).mean())

    for k in (2, 3):
        assert err(k, 10) < err(k, 0)
    assert err(3, 10) < err(2, 10) < err(1, 10)


def test_free_mrbiq_weights_take_at_most_two_to_the_bits_values_per_channel():
    w = _weight()
    spec = QSpec(2, True, True, 0)
    m = MrBiQQuantizer.from_quantizer(_calibrated(spec, w), w)
    m.begin_training(ReconConfig(iters=10, w_step_lr=1e-3))
    with torch.no_grad():
        m.codes.uniform_(-1, 1)
        m.alpha.mul_(1.1)
    g = torch.randn_like(w)
    (m(w) * g).sum().backward()
    # the relaxed value is linear in the codes: d w_hat / d c_i = alpha_i
    torch.testing.assert_close(m.codes.grad, m.alpha.T[:, :, None, None, None] * g)
    m.harden()
    out = m(w)
    for c in range(8):
        assert out[c].unique().numel() <= 4
    expected = (m.alpha.T[:, :, None, None, None] * torch.where(m.codes >= 0, 1.0, -1.0)).sum(0)
    assert torch.equal(out, expected)
    assert m.regularizer() is None and m.convergence() == (0, m.codes.numel())


UNIFORM = {"asymmetric": QSpec(3, True, False, 0), "centered": QSpec(4, True, False, 0, centered=True),
           "half-integer zero points": QSpec(2, True, False, 0, centered=True, zp_halves=True),
           "midrise": QSpec(2, True, True, 0, midrise=True), "symmetric per tensor": QSpec(3, True, True)}


@pytest.mark.parametrize("grid", UNIFORM)
def test_mrbiq_uniform_starts_exactly_at_round_to_nearest(grid):
    w = _weight()
    q = _calibrated(UNIFORM[grid], w)
    u = MrBiQUniformQuantizer.from_quantizer(q, w)
    assert torch.equal(u(w), q(w)) and torch.equal(u.int_repr(w), q.int_repr(w))
    u.begin_training(ReconConfig(iters=10))
    assert torch.equal(u(w), q(w))


def test_mrbiq_uniform_grid_is_an_asymmetric_uniform_grid_and_its_integers_reproduce_it():
    w = _weight(1)
    spec = UNIFORM["centered"]
    q = _calibrated(spec, w)
    u = MrBiQUniformQuantizer.from_quantizer(q, w)
    u.begin_training(ReconConfig(iters=10, w_step_lr=1e-3))
    with torch.no_grad():
        u.codes.uniform_(-1, 1)
        u.scale.mul_(1.05)
    u.harden()
    s, z = u.scale[:, None, None, None], u.zero_point[:, None, None, None]
    b = u.codes
    assert set(b.unique().tolist()) <= {-1.0, 1.0}
    # binary coding with tied scales alpha_i = 2^(k-i) s / 2 plus a per-channel offset ...
    alpha = torch.tensor([2.0 ** (spec.bits - 1 - i) for i in range(spec.bits)])[:, None, None, None, None] * s / 2
    offset = (spec.qmin + (2 ** spec.bits - 1) / 2 - z) * s
    torch.testing.assert_close(u(w), (alpha * b).sum(0) + offset, rtol=0, atol=1e-6)
    # ... is the asymmetric uniform grid (q - z) s with q in [qmin, qmax]
    levels = u(w) / s + z
    torch.testing.assert_close(levels, levels.round(), rtol=0, atol=1e-5)
    assert levels.min() >= spec.qmin - 1e-5 and levels.max() <= spec.qmax + 1e-5
    assert levels.round().unique().numel() == 2 ** spec.bits  # every level in use after random codes
    # the stored integers, read with the stored step and zero point, give back the same weights
    stored = u.int_repr(w) * u.stored_scale()[:, None, None, None] - u.stored_zero_point()[:, None, None, None]
    assert torch.equal(stored, u(w))


def test_onnx_int8_refuses_free_mrbiq_in_one_line(tiny, tmp_path, capsys):
    out = tmp_path / "o.onnx"
    code, err = run_cli([str(tiny), "--method", "mrbiq", "--iters", "5", "-o", str(out)], capsys)
    assert code == 2
    _assert_clean_failure(code, err, out, "no integer form", "--target onnx-fp", "mrbiq-uniform")


def test_onnx_fp_deploys_free_mrbiq_in_float_and_ort_agrees(tiny, tmp_path):
    out = tmp_path / "m.onnx"
    r = qcompiler.compile(str(tiny), bits="w2a8", method="mrbiq", target="onnx-fp", iters=30, output=out)
    agree = r.checks["agreement"]
    assert agree["top1_agreement"] == 1.0 and agree["worst_error"] <= 1e-4
    counts = ob.optimized_op_counts(out.read_bytes())
    assert not any(k in ob.INT_COMPUTE or "Quantize" in k for k in counts), counts  # simulated, not fused
    assert counts["Conv"] == 2
    # the deployed weights are the binary-coded ones: at most 2^2 values per output channel
    model = onnx.load(str(out))
    weights = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer if "c2" in i.name}
    w = next(v for k, v in weights.items() if v.ndim == 4)
    assert all(len(set(w[c].ravel().tolist())) <= 4 for c in range(w.shape[0]))
    # the integer lowering refuses the same program, naming the quantizer
    with pytest.raises(LoweringError, match="qc_w_c1.*no integer form"):
        LowerOnnxQdq().run(r.program)


def test_weights_only_bits_need_a_float_target_and_leave_activations_float(tiny, tmp_path, capsys):
    out = tmp_path / "o.onnx"
    code, err = run_cli([str(tiny), "--bits", "w2", "-o", str(out)], capsys)
    _assert_clean_failure(code, err, out, "weights-only", "--target onnx-fp")
    r = qcompiler.compile(str(tiny), bits="w2", method="mrbiq", target="onnx-fp", iters=20, output=out)
    assert not list(r.program.quantizer_nodes("act")) and len(list(r.program.quantizer_nodes("weight"))) == 3
    assert r.checks["agreement"]["worst_error"] <= 1e-5  # float ops on both sides, same order
    types = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert not types & {"Round", "QuantizeLinear", "DequantizeLinear", "Gather"}


def test_mrbiq_uniform_lowers_to_integer_kernels_equal_to_fake_quant(tiny):
    r = qcompiler.compile(str(tiny), bits="w2a8", method="mrbiq-uniform", iters=30)
    assert r.report["config"]["weight_quantizer"] == "mrbiq-uniform"
    assert sum(r.checks["integer_kernels"]["integer_kernels"].values()) >= 3
    assert r.checks["agreement"]["worst_error"] == 0.0
