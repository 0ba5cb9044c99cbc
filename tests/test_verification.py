"""The compile's ORT check is trustworthy: it runs on inputs calibration never saw, its settings are
validated, and a broken lowering fails it with exit 2, one line, no output and no temporary file."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import torch
from onnx import numpy_helper

import qcompiler
from qcompiler.backends.onnx_qdq import LowerOnnxQdq
from qcompiler.cli import main
from qcompiler.errors import ConfigError, VerificationError

from conftest import MODELS, TINY


def _clean_failure(capsys, code: int, out: Path, *needles: str) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("qcompile: error:"), err
    for n in needles:
        assert n in lines[0], lines[0]
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]
    return lines[0]


def _break_lowering(monkeypatch, edit) -> None:
    """Hand the target's check ``edit(model)`` of the lowered model, as a lowering bug would."""
    from qcompiler.backends.ort import VerifyOrt

    run = VerifyOrt.run

    def broken(self, program):
        model = onnx.load_from_string(program.lowered.onnx_bytes)
        edit(model, program)
        program.lowered.onnx_bytes = model.SerializeToString()
        return run(self, program)

    monkeypatch.setattr(VerifyOrt, "run", broken)


def _strip_clips(model: onnx.ModelProto, program) -> None:
    rename = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "Clip"}
    assert rename, "the lowering has no Clip to strip"
    keep = [n for n in model.graph.node if n.op_type != "Clip"]
    for n in keep:
        for i, name in enumerate(n.input):
            n.input[i] = rename.get(name, name)
    del model.graph.node[:]
    model.graph.node.extend(keep)


def _corrupt_a_scale(model: onnx.ModelProto, program) -> None:
    """Scale the output's DequantizeLinear by 1.5 (a rescaled output keeps every cosine and top-1)."""
    dq = next(n for n in model.graph.node if n.output[0] == model.graph.output[0].name)
    assert dq.op_type == "DequantizeLinear"
    init = next(t for t in model.graph.initializer if t.name == dq.input[1])
    model.graph.initializer.append(numpy_helper.from_array(numpy_helper.to_array(init) * 1.5, "corrupted_scale"))
    dq.input[1] = "corrupted_scale"


def _float_model(model: onnx.ModelProto, program) -> None:
    from qcompiler.backends.onnx_qdq import export_onnx

    model.CopyFrom(onnx.load_from_string(export_onnx(program.model, program.example_inputs)))


@pytest.mark.parametrize("edit, needles", [
    (_strip_clips, ("disagrees", "held-out calibration samples")),
    (_corrupt_a_scale, ("disagrees", "off by 0.5 relative")),
    (_float_model, ("float compute op",)),
])
def test_a_broken_lowering_fails_the_compile_cleanly(tiny, tmp_path, capsys, monkeypatch, edit, needles):
    out = tmp_path / "o.onnx"
    assert main([str(tiny), "--bits", "w4a4", "--no-first-last-8bit", "-q", "-o", str(out)]) == 0  # intact: fine
    out.unlink()
    capsys.readouterr()
    _break_lowering(monkeypatch, edit)
    code = main([str(tiny), "--bits", "w4a4", "--no-first-last-8bit", "-q", "-o", str(out)])
    _clean_failure(capsys, code, out, *needles)


@pytest.mark.parametrize("args, option, needle", [
    (["--verify-samples", "0"], {"verify_samples": 0}, "verify_samples=0"),
    (["--min-agreement", "0"], {"min_agreement": 0.0}, "min_agreement=0.0"),
    (["--max-error", "1"], {"max_error": 1.0}, "max_error=1.0"),
    (["--min-agreement", "1.5"], {"min_agreement": 1.5}, "min_agreement=1.5"),
])
def test_verification_settings_are_validated(tiny, tmp_path, capsys, args, option, needle):
    out = tmp_path / "o.onnx"
    _clean_failure(capsys, main([str(tiny), "-q", "-o", str(out), *args]), out, needle)
    with pytest.raises(ConfigError, match=needle):
        qcompiler.compile(str(tiny), **option)


def test_verification_holds_out_calibration_samples_and_records_it(tiny):
    r = qcompiler.compile(str(tiny), bits="w8a8")
    agree = r.checks["agreement"]
    assert agree["samples"] == 32 and sum(len(b[0]) for b in r.program.calib) == 96
    assert agree["inputs"] == "held-out calibration samples: the last 32 of 128 (calibration used the other 96)"
    held = torch.cat([b[0] for b in r.program.verify])
    g = torch.Generator().manual_seed(1)
    every = torch.cat([torch.randn(16, 3, 8, 8, generator=g) for _ in range(8)])
    assert torch.equal(held, every[96:])  # the last samples, which calibration did not see
    assert agree["top1_agreement"] == 1.0 and agree["worst_error"] == 0.0  # ORT's integers, bit for bit


def test_model_file_verification_data_is_used_when_given(tiny, tmp_path):
    f = tmp_path / "with_verify.py"
    f.write_text(TINY + "\ndef verification_data(verify_num=256):\n"
                 "    return [(torch.full((4, 3, 8, 8), 0.5),), (torch.full((4, 3, 8, 8), -0.5),)]\n")
    r = qcompiler.compile(str(f), bits="w8a8")
    assert r.checks["agreement"]["samples"] == 8 and "with_verify.py: verification_data()" in \
        r.checks["agreement"]["inputs"]
    assert sum(len(b[0]) for b in r.program.calib) == 128  # nothing held out


def test_too_little_calibration_data_to_hold_out_is_an_error():
    from qcompiler.errors import CalibrationDataError

    model = torch.nn.Sequential(torch.nn.Linear(4, 2)).eval()
    with pytest.raises(CalibrationDataError, match="none to hold out"):
        qcompiler.compile(model, example_inputs=(torch.randn(1, 4),), calib=[(torch.randn(3, 4),)])


def test_api_refuses_to_write_an_unverified_model(tiny, tmp_path):
    from qcompiler.passes import Calibrate, FoldBatchNorm, InsertQuantizers, Trace

    out = tmp_path / "o.onnx"
    with pytest.raises(VerificationError, match="no pass checked"):
        qcompiler.compile(str(tiny), output=out,
                          passes=[Trace(), FoldBatchNorm(), InsertQuantizers(), Calibrate(), LowerOnnxQdq()])
    assert not out.exists() and not list(tmp_path.glob(".o.onnx*"))


def test_cli_summary_counts_float_kernels(tiny, tmp_path, capsys):
    assert main([str(tiny), "-q", "-o", str(tmp_path / "o.onnx")]) == 0
    line = capsys.readouterr().out.splitlines()[0]
    assert "3 integer kernels, 0 float" in line and "on 32 held-out samples" in line, line


def test_resnet_verifies_on_validation_images(compiled, shared_cifar):
    """calib5k rows 1,024 on: images of the training split that the 1,024 calibration images are not."""
    from qcompiler.api import load_model_file

    r = compiled("resnet_cifar.py", bits="w8a8")
    assert "resnet_cifar.py: verification_data()" in r.checks["agreement"]["inputs"]
    assert r.checks["agreement"]["samples"] == 256
    ver = load_model_file(MODELS / "resnet_cifar.py").verification_data(verify_num=8)[0][0]
    assert torch.equal(r.program.verify[0][0][:8], ver)
    calib = torch.cat([b[0] for b in r.program.calib])
    assert len(calib) == 1024 and not (calib[:, None] == ver[None]).flatten(2).all(2).any()


def test_noise_floor_is_the_worst_of_its_perturbed_runs():
    """Values on rounding ties: each perturbed run flips its own subset, so more runs see more."""
    from torch import fx

    from qcompiler.backends import ort as ob

    class Tie(torch.nn.Module):
        def forward(self, x):
            return torch.round(x * 1.0)

    gm = fx.symbolic_trace(Tie())
    x = torch.arange(64, dtype=torch.float32).reshape(4, 16) + 0.5 + 1e-3 * (torch.arange(4)[:, None] == 0)
    one, three = ob.noise_floor(gm, [(x,)], runs=1), ob.noise_floor(gm, [(x,)], runs=3)
    assert one["worst_error"] > 0  # a float32 rounding flips ties
    assert three["worst_error"] > one["worst_error"] and three["mean_error"] > one["mean_error"]
    assert three["worst_sample"] != 0  # the first sample sits off the ties: nothing flips there


def test_noise_floor_runs_the_model_with_torchs_reference_kernels_too():
    """A leaf module whose result depends on the kernels torch picks: only that run sees it move."""
    from torch import fx

    from qcompiler.backends import ort as ob

    class KernelDependent(torch.nn.Module):
        def forward(self, x):
            return x if torch.backends.mkldnn.enabled else x + 1.0

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.k = KernelDependent()

        def forward(self, x):
            return self.k(x)

    class Leaf(fx.Tracer):
        def is_leaf_module(self, m, name):
            return isinstance(m, KernelDependent) or super().is_leaf_module(m, name)

    net = Net()
    gm = fx.GraphModule(net, Leaf().trace(net))
    x = torch.ones(2, 3)
    floor = ob.noise_floor(gm, [(x,)], runs=1)
    assert floor["worst_error"] == pytest.approx(1.0)  # ||(x + 1) - x|| / ||x||
