"""The low-bit clamp must survive lowering: a test that fails when Clip is dropped."""

from __future__ import annotations

import numpy as np
import onnx
import torch
from torch import nn

import qcompiler
from qcompiler.backends import ort as ort_backend


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def _compile(bits: str):
    torch.manual_seed(0)
    calib = [(torch.randn(32, 16),) for _ in range(4)]
    return qcompiler.compile(Tiny().eval(), example_inputs=(torch.randn(1, 16),), calib=calib, bits=bits,
                             first_last_8bit=False)


def _without_clips(model: onnx.ModelProto) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    keep = []
    rename = {}
    for n in m.graph.node:
        if n.op_type == "Clip":
            rename[n.output[0]] = n.input[0]
        else:
            keep.append(n)
    for n in keep:
        for i, name in enumerate(n.input):
            if name in rename:
                n.input[i] = rename[name]
    del m.graph.node[:]
    m.graph.node.extend(keep)
    return m


def test_clip_present_and_needed_at_4_bits():
    r = _compile("w4a4")
    model = onnx.load_from_string(r.onnx_bytes)
    assert sum(n.op_type == "Clip" for n in model.graph.node) >= 2
    x = (torch.randn(64, 16) * 4,)  # wide inputs saturate the 4-bit grid
    with torch.no_grad():
        ref = r.program.gm(*x).numpy()
    sess = ort_backend.session(r.onnx_bytes)
    got = sess.run(None, ort_backend.feeds(sess, x))[0]
    assert np.abs(got - ref).max() < 1e-4 * np.abs(ref).max() + 1e-3
    # The same model with the Clips removed computes an 8-bit model: it must disagree.
    stripped = _without_clips(model).SerializeToString()
    sess2 = ort_backend.session(stripped)
    got2 = sess2.run(None, ort_backend.feeds(sess2, x))[0]
    assert np.abs(got2 - ref).max() > 10 * np.abs(got - ref).max() + 1e-2


def test_no_clip_at_8_bits_when_relu_absorbed():
    r = _compile("w8a8")
    model = onnx.load_from_string(r.onnx_bytes)
    types = [n.op_type for n in model.graph.node]
    assert "Relu" not in types  # folded into the quantizer's integer bounds
    assert ort_backend.optimized_op_counts(r.onnx_bytes)["QGemm"] + \
        ort_backend.optimized_op_counts(r.onnx_bytes)["QLinearMatMul"] >= 2


class DeadChannel(nn.Module):
    """A conv whose channel 1 has all-but-zero weights and a bias of 20: what BatchNorm folding leaves of
    a dead channel (EfficientNet-Lite0's stem has one, with a bias of -5.9)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Conv2d(4, 2, 1)
        with torch.no_grad():
            self.conv.weight[1] = torch.randn(3, 3, 3) * 1e-9
            self.conv.bias[1] = 20.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)))


def test_a_dead_channels_bias_fits_int32_and_onnx_equals_fake_quant():
    """The dead channel's weight step would put its bias at about 5e9 accumulator steps, beyond int32:
    clamped (or wrapped around in the accumulator) in the deployed model. Calibration widens the step."""
    torch.manual_seed(0)
    calib = [(torch.randn(8, 3, 8, 8),) for _ in range(2)]
    r = qcompiler.compile(DeadChannel().eval(), example_inputs=(torch.randn(1, 3, 8, 8),), calib=calib,
                          bits="w4a4", first_last_8bit=False)
    assert next(p for p in r.report["passes"] if p["pass"] == "calibrate")["widened_for_bias"] == 1
    model = onnx.load_from_string(r.onnx_bytes)
    biases = [onnx.numpy_helper.to_array(t) for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT32]
    assert biases and all(int(np.abs(b).max()) <= 2**24 for b in biases)
    x = (torch.randn(16, 3, 8, 8),)
    with torch.no_grad():
        ref = r.program.gm(*x).numpy()
    sess = ort_backend.session(r.onnx_bytes)
    got = sess.run(None, ort_backend.feeds(sess, x))[0]
    assert np.abs(got - ref).max() < 1e-4 * np.abs(ref).max() + 1e-5
