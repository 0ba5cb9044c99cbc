"""Long accuracy and speed runs (``pytest -m slow``); their commands also live in bench/."""

from __future__ import annotations

import sys

import pytest

from conftest import MODELS, ROOT

sys.path.insert(0, str(ROOT / "bench"))

pytestmark = pytest.mark.slow


def test_efficientnet_lite0_w8a8_within_a_fifth_of_a_point_of_float(efficientnet):
    """imagenet-val, float 82.69: the bar is 82.49 (ONNX Runtime's own quantize_static gives 82.85)."""
    import accuracy

    row = accuracy.evaluate_all(str(MODELS / "efficientnet_lite.py"), "w8a8")
    assert row["float"] - row["ort"] <= 0.2, row
    assert row["agreement"] >= 99.5, row


def test_resnet20_quantized_onnx_size_and_batch64_latency():
    import latency

    row = latency.measure(str(MODELS / "resnet_cifar.py"), "w8a8", threads=2, rounds=30, batches=(64,))
    assert row["size_quant"] <= 0.35 * row["size_fp32"], row
    assert row["batch64"]["ratio"] <= 0.6, row


@pytest.mark.parametrize("bits, floor", [("w4a4", 80.0), ("w2a4", 77.7)])
def test_resnet20_qdrop_2000_iterations_beats_official_qdrop(bits, floor):
    """The issue's bar: the official QDrop code reached 79.70-80.00 (W4A4) and 77.70 (W2A4) here."""
    import accuracy

    row = accuracy.evaluate_all(str(MODELS / "resnet_cifar.py"), bits, method="qdrop", iters=2000)
    assert row["ort"] >= floor, row
    assert row["agreement"] >= 99.5, row


@pytest.mark.parametrize("bits", ["w4a4", "w2a4"])
def test_resnet20_qdrop_20000_iterations_at_least_as_good_as_2000(bits):
    """The issue: ten times the iterations must not lose accuracy (about an hour per width here)."""
    import accuracy

    rows = [accuracy.evaluate_all(str(MODELS / "resnet_cifar.py"), bits, method="qdrop", iters=n)
            for n in (2000, 20000)]
    assert rows[1]["ort"] >= rows[0]["ort"], rows


def test_resnet20_w4a4_qdrop_compile_faster_than_official_qdrop():
    """Official QDrop took 475 s for the whole W4A4 run at 2000 iterations on this machine."""
    import time

    import qcompiler

    t0 = time.perf_counter()
    qcompiler.compile(str(MODELS / "resnet_cifar.py"), bits="w4a4", method="qdrop", iters=2000)
    assert time.perf_counter() - t0 < 475.0


@pytest.mark.parametrize("bits, within", [("w4a4", 2.5), ("w4a8", 1.0)])
def test_efficientnet_lite0_qdrop_2000_iterations(efficientnet, bits, within):
    """imagenet-val, calibrated on the 1,000-image sample (hours on this machine)."""
    import accuracy

    row = accuracy.evaluate_all(str(MODELS / "efficientnet_lite.py"), bits, method="qdrop", iters=2000)
    assert row["float"] - row["ort"] <= within, row
    assert row["agreement"] >= 99.0, row


def test_resnet20_mrbiq_2bit_weights_far_above_round_to_nearest():
    """bench/results/methods_resnet20_2000.md: weights only at 2 bits, rtn 25.34, mrbiq 78.39 (onnx-fp)."""
    import accuracy

    rows = {m: accuracy.evaluate_all(str(MODELS / "resnet_cifar.py"), "w2", method=m, target="onnx-fp",
                                     **({} if m == "rtn" else {"iters": 2000})) for m in ("rtn", "mrbiq")}
    assert rows["mrbiq"]["ort"] >= rows["rtn"]["ort"] + 40.0, rows
    assert rows["mrbiq"]["agreement"] >= 99.0, rows
