"""Shared fixtures: quiet logging, paths, model-file loading, and cached compiles.

Compiles are cached per session (``compiled``) because several tests inspect the same result.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("QCOMPILER_DATA", ROOT.parent / "shared" / "data"))
MODELS = ROOT / "models"

warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=DeprecationWarning)
for name in ("onnx_ir", "onnxscript", "torch", "torch.onnx", "torch.onnx._internal.exporter._registration",
             "torch.export", "torch.__trace", "torch._export.non_strict_utils"):
    logging.getLogger(name).setLevel(logging.ERROR)
torch.set_num_threads(2)

needs_shared = pytest.mark.skipif(not (DATA / "cifar10" / "test10k.npz").exists(),
                                  reason="../shared/data is not present")


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
