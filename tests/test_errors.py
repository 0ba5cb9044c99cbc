"""Bad input gets a clear one-line error, a non-zero exit, no traceback and no output file."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from qcompiler.cli import main

from conftest import MODELS, ROOT

RESNET = str(MODELS / "resnet_cifar.py")


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    code = main(args)
    err = capsys.readouterr().err
    return code, err


def _last_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("qcompile:")]
    assert lines, err
    return lines[-1]


def _assert_clean_failure(code: int, err: str, out: Path, *needles: str) -> None:
    assert code != 0
    assert "Traceback" not in err
    line = _last_line(err)
    for n in needles:
        assert n in line, line
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


def test_model_file_without_build(tmp_path, capsys):
    f = tmp_path / "nobuild.py"
    f.write_text("def example_inputs():\n    return ()\n\ndef calibration_data():\n    return []\n")
    out = tmp_path / "o.onnx"
    code, err = run_cli([str(f), "-o", str(out)], capsys)
    _assert_clean_failure(code, err, out, "nobuild.py", "build()")


def test_missing_model_file(tmp_path, capsys):
    out = tmp_path / "o.onnx"
    code, err = run_cli([str(tmp_path / "nope.py"), "-o", str(out)], capsys)
    _assert_clean_failure(code, err, out, "does not exist")


UNTRACEABLE = """
import torch
from torch import nn

class M(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: no capture path can take it
            return self.fc(x)
        return -self.fc(x)

def build():
    return M().eval()

def example_inputs():
    return (torch.randn(2, 4),)

def calibration_data():
    return [(torch.randn(8, 4),)]
"""


def test_model_neither_capture_path_can_take(tmp_path, capsys):
    f = tmp_path / "untraceable.py"
    f.write_text(UNTRACEABLE)
    out = tmp_path / "o.onnx"
    code, err = run_cli([str(f), "-o", str(out)], capsys)
    _assert_clean_failure(code, err, out, "could not capture", "symbolic_trace", "torch.export",
                          "untraceable.py:11")


UNEXPORTABLE = """
import torch
from torch import nn

class Spectrum(nn.Module):
    def forward(self, y):
        EXTRA
        return torch.linalg.eigh(y.transpose(-1, -2) @ y)[0]  # no ONNX translation

class M(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.block = Spectrum()

    def forward(self, x):
        return self.block(self.fc(x))

def build():
    return M().eval()

def example_inputs():
    return (torch.randn(8, 4),)

def calibration_data():
    return [(torch.randn(8, 4),) for _ in range(3)]
"""


@pytest.mark.parametrize("extra", ["pass", "y = y.clone(); y[:, 0] = y[:, 0] * 1.0  # symbolic_trace rejects this"])
def test_onnx_export_failure_names_the_op_and_module(tmp_path, capsys, extra):
    f = tmp_path / "unexportable.py"
    f.write_text(UNEXPORTABLE.replace("EXTRA", extra))
    out = tmp_path / "o.onnx"
    code, err = run_cli([str(f), "-o", str(out)], capsys)
    _assert_clean_failure(code, err, out, "ONNX export", "aten._linalg_eigh", "module block of type Spectrum",
                          "could not be translated")


def _npz(path: Path, images: np.ndarray) -> str:
    np.savez(path, images=images, labels=np.zeros(len(images), dtype=np.int64))
    return str(path)


def test_calibration_with_nan(tmp_path, capsys):
    bad = str(tmp_path / "nan.py")
    Path(bad).write_text(textwrap.dedent("""
        import torch, importlib.util
        spec = importlib.util.spec_from_file_location("r", %r)
        r = importlib.util.module_from_spec(spec); spec.loader.exec_module(r)
        build, example_inputs = r.build, r.example_inputs
        def calibration_data():
            x = torch.randn(8, 3, 32, 32)
            x[3, 1, 2, 2] = float("nan")
            return [(x,)]
    """) % RESNET)
    out = tmp_path / "o.onnx"
    code, err = run_cli([bad, "-o", str(out)], capsys)
    _assert_clean_failure(code, err, out, "NaN", "batch 0")


def test_calibration_of_wrong_shape(tmp_path, capsys):
    calib = _npz(tmp_path / "big.npz", np.zeros((4, 64, 64, 3), dtype=np.uint8))
    out = tmp_path / "o.onnx"
    code, err = run_cli([RESNET, "--calib", calib, "-o", str(out)], capsys)
    _assert_clean_failure(code, err, out, "32 x 32 x 3")


def test_calibration_batches_of_wrong_shape_python_api(tmp_path):
    import torch

    import qcompiler
    from qcompiler.errors import CalibrationDataError

    model = torch.nn.Sequential(torch.nn.Linear(4, 2)).eval()
    with pytest.raises(CalibrationDataError, match=r"shape \(2, 5\).*\('N', 4\)"):
        qcompiler.compile(model, example_inputs=(torch.randn(1, 4),), calib=[(torch.randn(2, 5),)])


@pytest.mark.parametrize("bits", ["w1a8", "w8a9", "w4", "x4a4"])
def test_bits_out_of_range(tmp_path, capsys, bits):
    out = tmp_path / "o.onnx"
    code, err = run_cli([RESNET, "--bits", bits, "-o", str(out)], capsys)
    _assert_clean_failure(code, err, out, bits)


def test_unknown_target(tmp_path, capsys):
    out = tmp_path / "o.onnx"
    code, err = run_cli([RESNET, "--target", "tflite", "-o", str(out)], capsys)
    _assert_clean_failure(code, err, out, "unknown target 'tflite'", "onnx-int8")


def test_unknown_method(tmp_path, capsys):
    out = tmp_path / "o.onnx"
    code, err = run_cli([RESNET, "--method", "magic", "-o", str(out)], capsys)
    _assert_clean_failure(code, err, out, "unknown method 'magic'")


def test_unwritable_output(tmp_path, capsys):
    out = tmp_path / "missing_dir" / "o.onnx"
    code, err = run_cli([RESNET, "-o", str(out)], capsys)
    assert code != 0 and "Traceback" not in err
    assert "cannot write" in _last_line(err)
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o500)
    try:
        if os.access(ro, os.W_OK):  # root ignores permissions: use a path under a file instead
            target = tmp_path / "afile"
            target.write_text("x")
            out2 = target / "o.onnx"
        else:
            out2 = ro / "o.onnx"
        code, err = run_cli([RESNET, "-o", str(out2)], capsys)
        assert code != 0 and "cannot write" in _last_line(err) and "Traceback" not in err
    finally:
        os.chmod(ro, 0o700)


def test_output_is_a_directory(tmp_path, capsys):
    code, err = run_cli([RESNET, "-o", str(tmp_path)], capsys)
    assert code != 0 and "is a directory" in _last_line(err)


def test_bad_override_names_no_layer(tmp_path, capsys):
    out = tmp_path / "o.onnx"
    code, err = run_cli([RESNET, "--override", "nosuchlayer*=w8a8", "-o", str(out)], capsys)
    _assert_clean_failure(code, err, out, "match no layer", "layer1.0.conv1")


def test_subprocess_exit_code_and_single_line(tmp_path):
    out = tmp_path / "o.onnx"
    proc = subprocess.run([sys.executable, "-m", "qcompiler.cli", RESNET, "--bits", "w9a9", "-o", str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert proc.stderr.startswith("qcompile: error:")
    assert not out.exists()
