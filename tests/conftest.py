"""Shared fixtures: quiet logging, paths, model-file loading, and cached compiles.

Compiles are cached per session (``compiled``) because several tests inspect the same result.
"""

from __future__ import annotations

import logging
import os
import sys
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
