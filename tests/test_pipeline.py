"""The pass contract, the registry, the CLI main job, the report, EfficientNet's kernels."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qcompiler
from qcompiler.backends import ort as ort_backend
from qcompiler.config import resolve
from qcompiler.errors import ConfigError, PreconditionError
from qcompiler.ir import registry
from qcompiler.ir.program import Program
from qcompiler.passes import Calibrate, FoldBatchNorm, InsertQuantizers, Trace

from conftest import MODELS, ROOT, assert_ort_equals_fake_quant


def _program(model: nn.Module, x: torch.Tensor) -> Program:
    from qcompiler.backends.onnx_qdq import OnnxInt8Target

    return Program(model=model, example_inputs=(x,), calib=[(x,)], config=resolve(), target=OnnxInt8Target())


def test_pass_contract_order_and_stop_after():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 6 * 6, 2)).eval()
    x = torch.randn(2, 3, 8, 8)
    p = _program(model, x)
    with pytest.raises(PreconditionError, match="run the trace pass first"):
        qcompiler.Pipeline([FoldBatchNorm()]).run(p)
    with pytest.raises(PreconditionError, match="insert_quantizers first"):
        qcompiler.Pipeline([Trace(), Calibrate()]).run(_program(model, x))
    with pytest.raises(ConfigError, match="names no pass"):
        qcompiler.Pipeline([Trace()], stop_after="calibrate")
    p = _program(model, x)
    qcompiler.Pipeline([Trace(), FoldBatchNorm(), InsertQuantizers(), Calibrate()], stop_after="fold_bn").run(p)
    assert [r["pass"] for r in p.report["passes"]] == ["trace", "fold_bn"]
    assert not list(p.quantizer_nodes())


def test_registry_knows_module_function_method_and_aten_forms():
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)
            self.r6 = nn.ReLU6()

        def forward(self, x):
            a = self.r6(self.conv(x))
            b = F.relu(F.conv2d(x, self.conv.weight))
            c = (a + b).relu()
            return torch.matmul(c.flatten(2), c.flatten(2).transpose(1, 2)).clamp(-1, 1)

    x = torch.randn(2, 3, 4, 4)
    seen = {}
    for force in ("symbolic_trace", "export"):
        p = _program(M().eval(), x)
        Trace(force=force).run(p)
        seen[force] = sorted(k for n in p.gm.graph.nodes if (k := registry.kind(n, p.gm)) and k != "reshape")
    assert seen["symbolic_trace"] == seen["export"]
    for k in ("conv", "hardtanh", "relu", "add", "matmul", "clamp", "flatten"):
        assert k in seen["export"], (k, seen)


def test_first_and_last_layer_8bit_and_overrides():
    r = qcompiler.compile(str(MODELS / "resnet_cifar.py"), bits="w4a4", stop_after="insert_quantizers",
                          overrides={"layer2.0.conv1": "w3a8"})
    gm = r.program.gm
    w_bits = {n.meta["qc.layer"]: n.meta["qc.qspec"].bits for n in r.program.quantizer_nodes("weight")}
    assert w_bits["conv1"] == 7 and w_bits["linear"] == 7  # 8-bit, stored in the 7-bit range (see target)
    assert w_bits["layer1.0.conv1"] == 4 and w_bits["layer2.0.conv1"] == 3
    act_bits = {n.meta["qc.of"]: n.meta["qc.qspec"].bits for n in r.program.quantizer_nodes("act")}
    assert act_bits["x"] == 8  # input of the first layer
    out = next(n for n in gm.graph.nodes if n.op == "output").all_input_nodes[0]
    assert out.meta["qc.qspec"].bits == 8


@pytest.mark.parametrize("a_bits_all", [False, True])
def test_activation_width_is_for_what_compute_layers_read(a_bits_all):
    r = qcompiler.compile(str(MODELS / "resnet_cifar.py"), bits="w4a4", stop_after="insert_quantizers",
                          a_bits_all=a_bits_all)
    gm = r.program.gm
    out = next(n for n in gm.graph.nodes if n.op == "output")
    read, other = set(), set()
    def readers(n):  # the compute ops reading n, directly or through views (a flatten before the classifier)
        for u in n.users:
            if registry.kind(u, gm) in registry.VIEW_KINDS:
                yield from readers(u)
            elif registry.kind(u, gm) in registry.COMPUTE_KINDS:
                yield u

    for n in r.program.quantizer_nodes("act"):
        layers = {u.meta.get("qc.layer") for u in readers(n)}
        if layers and not layers & {"conv1", "linear"}:  # first and last layer inputs are 8-bit
            read.add(n.meta["qc.qspec"].bits)
        elif not layers and n not in out.all_input_nodes:
            other.add((n.meta["qc.of"], n.meta["qc.qspec"].bits))
    assert read == {4}
    # per residual block the conv output and the shortcut that the add reads, and the last block's
    # output (read by the pooling)
    assert len(other) == 19
    assert {b for _, b in other} == {4 if a_bits_all else 8}


@pytest.mark.parametrize("w_symmetric", [None, False, True])
def test_weight_grids_by_default_centered_depthwise_included(w_symmetric, efficientnet):
    r = qcompiler.compile(str(MODELS / "efficientnet_lite.py"), bits="w4a4", stop_after="insert_quantizers",
                          w_symmetric=w_symmetric, model_args={"num": 8})
    gm = r.program.gm
    specs = {}
    for n in r.program.quantizer_nodes("weight"):
        w = registry.get_tensor(gm, str(n.args[0].target))
        kind = "8-bit" if n.meta["qc.qspec"].bits > 4 else "depthwise" if w.dim() == 4 and w.shape[1] == 1 else "other"
        specs.setdefault(kind, set()).add((n.meta["qc.qspec"].symmetric, n.meta["qc.qspec"].centered))
    centered = {"depthwise": w_symmetric is not True, "other": w_symmetric is not True, "8-bit": False}
    assert specs.keys() == centered.keys()
    for kind, specs_of_kind in specs.items():
        assert specs_of_kind == {(not centered[kind], centered[kind])}, kind


def test_main_command_under_60s_and_report(tmp_path):
    out, rep = tmp_path / "r20.onnx", tmp_path / "rep"
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "qcompiler.cli", str(MODELS / "resnet_cifar.py"), "--target",
                           "onnx-int8", "-o", str(out), "--report", str(rep), "-q"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    elapsed = time.perf_counter() - t
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert elapsed < 60, elapsed
    assert out.stat().st_size > 100_000
    report = json.loads((rep / "report.json").read_text())
    assert report["checks"]["integer_kernels"]["ok"] and report["capture"]["path"] == "symbolic_trace"
    assert [r["pass"] for r in report["passes"]] == ["trace", "decompose_attention", "linear_forms", "fold_bn",
                                                    "split_outliers", "insert_quantizers", "calibrate",
                                                    "lower_onnx_qdq", "verify_ort"]
    assert "integer kernels" in (rep / "summary.md").read_text()
    assert "wrote" in proc.stdout


def test_cli_eval_prints_float_fake_quant_and_ort(tmp_path, capsys):
    from qcompiler.cli import main

    code = main([str(MODELS / "resnet_cifar.py"), "-o", str(tmp_path / "m.onnx"), "--eval", "-q",
                 "--model-arg", "limit=500"])
    out = capsys.readouterr().out
    assert code == 0
    lines = {ln.split()[0]: ln for ln in out.splitlines() if ln.startswith("  ")}
    assert set(lines) == {"float", "fake_quant", "ort"}
    assert "'n': 500" in lines["ort"]


def test_default_learning_rates_keep_lr_times_iterations_beyond_2000():
    recon = {n: resolve({"iters": n}).recon for n in (20, 2000, 20000)}
    lrs = {n: (r.weight_lr(), r.act_lr()) for n, r in recon.items()}
    assert lrs[20] == lrs[2000] == (1e-2, 4e-5)
    assert lrs[20000] == pytest.approx((1e-3, 4e-6))
    given = resolve({"iters": 20000, "w_lr": 5e-3, "a_lr": 1e-4}).recon
    assert (given.weight_lr(), given.act_lr()) == (5e-3, 1e-4)
    with pytest.raises(ConfigError, match="w_lr"):
        resolve({"w_lr": 0.0})


def test_efficientnet_lite_every_conv_is_integer_including_depthwise(efficientnet):
    r = qcompiler.compile(str(MODELS / "efficientnet_lite.py"), bits="w8a8", model_args={"num": 64},
                          verify_samples=16)
    counts = ort_backend.optimized_op_counts(r.onnx_bytes)
    depthwise = [n for n in r.program.gm.graph.nodes if registry.kind(n, r.program.gm) == "conv"
                 and registry.args_of(n, r.program.gm)["groups"] > 1]
    assert len(depthwise) == 16
    assert counts["QLinearConv"] == 49 and counts["QGemm"] == 1, counts
    assert not set(counts) & ort_backend.FLOAT_COMPUTE
    assert "verification_data()" in r.checks["agreement"]["inputs"]  # imagenet-val images, not calibration ones
    x = torch.cat([b[0] for b in r.program.calib])[:8] + 0.05 * torch.randn(8, 3, 224, 224)
    assert_ort_equals_fake_quant(r, (x,))
    sess = ort_backend.session(r.onnx_bytes)
    with torch.no_grad():  # the same graph with float requantization parts from ORT at rounding ties
        assert not torch.equal(r.program.gm(x), torch.from_numpy(sess.run(None, ort_backend.feeds(sess, (x,)))[0]))


def test_efficientnet_calibration_views_are_the_image_its_mirror_and_reproducible_crops(efficientnet):
    from qcompiler.api import load_model_file

    mod = load_model_file(MODELS / "efficientnet_lite.py")
    one = torch.cat([b[0] for b in mod.calibration_data(num=6, batch_size=4)])
    four = torch.cat([b[0] for b in mod.calibration_data(num=6, batch_size=4, views=4)])
    assert four.shape == (24, *one.shape[1:])
    assert torch.equal(four[:6], one) and torch.equal(four[6:12], one.flip(-1))
    crops = four[12:]
    assert torch.equal(crops, torch.cat([b[0] for b in mod.calibration_data(num=6, batch_size=4, views=4)])[12:])
    assert crops.abs().max() <= one.abs().max() + 1e-6  # bilinear resampling stays within the input's range
    for c in crops.view(2, 6, *one.shape[1:]).unbind(0):  # each crop differs from its image and its mirror
        assert all(not torch.allclose(c[i], one[i], atol=1e-2) and not torch.allclose(c[i], one[i].flip(-1), atol=1e-2)
                   for i in range(6))
    with pytest.raises(ValueError, match="views"):
        mod.calibration_data(num=2, views=0)
