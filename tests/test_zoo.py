"""The model zoo: small Hugging Face architectures compile at W8A8, verified, every planned layer integer."""

from __future__ import annotations

import sys

import pytest
import torch

import qcompiler
from qcompiler.backends import ort as ort_backend
from qcompiler.errors import VerificationError

from conftest import ROOT, require

sys.path.insert(0, str(ROOT / "models"))

MODEL = str(ROOT / "models" / "hf_zoo.py")
FAST = ("bert", "gpt2", "vit", "efficientnet")
SLOW = ("resnet", "mobilenet_v2", "convnext", "mobilevit", "swin", "distilbert")
ATTENTION = {"bert": 2, "distilbert": 2, "gpt2": 2, "vit": 2, "swin": 2}  # transformer layers in the configs


@pytest.fixture(scope="module")
def zoo():
    require(modules=("transformers",))
    import hf_zoo

    return hf_zoo


def _check(zoo, arch: str) -> None:
    r = qcompiler.compile(MODEL, model_args={"arch": arch}, bits="w8a8")
    assert r.report["capture"]["path"] == "torch.export"  # HF forwards take *args/kwargs: fx cannot trace them
    kernels = r.checks["integer_kernels"]
    assert kernels["float_kernels"] == {} and not kernels["kept_float"]
    assert sum(kernels["integer_kernels"].values()) >= len(r.program.state.quantized_layers) > 0
    counts = ort_backend.optimized_op_counts(r.onnx_bytes)
    if arch in ATTENTION:  # both attention products of every layer run as integer kernels
        attention = counts["QLinearMatMul"] + counts["MatMulIntegerToFloat"]
        assert attention >= 2 * ATTENTION[arch], counts
        assert counts.get("Where", 0) <= 1, counts  # a boolean mask becomes a bias once, not a select per layer
    assert not counts.get("Erf"), counts  # GELU runs as ORT's one fused kernel, not five element-wise ones
    # ORT and the fake-quant model agree on fresh inputs, not only on the compile's own check
    fresh = zoo._batch(arch, 8, torch.Generator().manual_seed(11))
    sess = ort_backend.session(r.onnx_bytes)
    got = torch.from_numpy(sess.run(None, ort_backend.feeds(sess, fresh))[0])
    with torch.no_grad():
        ref = r.fake_quant(*fresh)
    assert float((got - ref).norm() / ref.norm()) < 1e-2


@pytest.mark.parametrize("arch", FAST)
def test_zoo_compiles_verified_with_integer_kernels(zoo, arch):
    _check(zoo, arch)


@pytest.mark.slow
@pytest.mark.parametrize("arch", SLOW)
def test_zoo_rest_compiles_verified_with_integer_kernels(zoo, arch):
    _check(zoo, arch)


def test_keep_float_layers_are_planned_and_a_planned_layer_in_float_fails(zoo):
    r = qcompiler.compile(MODEL, model_args={"arch": "bert"}, bits="w8a8", keep_float=["*.intermediate.dense"])
    kernels = r.checks["integer_kernels"]
    assert sorted(kernels["kept_float"]) == ["model.encoder.layer.0.intermediate.dense",
                                             "model.encoder.layer.1.intermediate.dense"]
    assert 0 < sum(kernels["float_kernels"].values()) <= 2
    assert len(r.program.state.quantized_layers) == 14  # 12 linears + 4 attention products - 2 kept
    # the same model checked as if nothing were planned float: the two float layers fail it
    with pytest.raises(VerificationError, match="planned QDQ pattern did not fuse"):
        ort_backend.check_integer_kernels(r.onnx_bytes, len(r.program.state.quantized_layers), {})


def test_keep_float_pattern_matching_nothing_is_an_error(zoo):
    from qcompiler.errors import ConfigError

    with pytest.raises(ConfigError, match="match no layer"):
        qcompiler.compile(MODEL, model_args={"arch": "bert"}, bits="w8a8", keep_float=["no.such.layer"])


def test_transformer_units_are_attention_and_feed_forward_sublayers(zoo):
    """The attention mask every layer reads does not keep the LayerNorm outputs from being cuts."""
    r = qcompiler.compile(MODEL, model_args={"arch": "bert"}, bits="w4a8", method="qdrop", stop_after="partition")
    layers = [u.layers for u in r.program.units]
    assert [len(x) for x in layers] == [6, 2, 6, 2], layers  # q, k, v, two products, output | FFN in, out
    assert layers[1] == ["model.encoder.layer.0.intermediate.dense", "model.encoder.layer.0.output.dense"]


def test_reconstruction_runs_on_transformer_sublayers(zoo):
    r = qcompiler.compile(MODEL, model_args={"arch": "bert"}, bits="w4a8", method="qdrop", iters=20)
    units = r.report["reconstruction"]["units"]
    assert len(units) == 4 and all(u["loss_after"] == u["loss_after"] for u in units)  # trained, no NaN
    assert r.checks["integer_kernels"]["float_kernels"] == {}


def test_noise_floor_does_not_accept_a_corrupted_transformer(zoo, monkeypatch):
    """Where the strict check fails, the floor is consulted; a rescaled output is far above it."""
    from test_verification import _break_lowering, _corrupt_a_scale

    _break_lowering(monkeypatch, _corrupt_a_scale)
    with pytest.raises(VerificationError, match="disagrees"):
        qcompiler.compile(MODEL, model_args={"arch": "bert"}, bits="w8a8")


def test_within_noise_rule():
    from qcompiler.config import TargetOptions

    floor = {"mean_error": 0.02, "worst_error": 0.1, "top1_agreement": 0.97}
    opts = TargetOptions()
    assert ort_backend.within_noise({"mean_error": 0.011, "worst_error": 0.12, "top1_agreement": 0.975}, floor, opts)
    assert not ort_backend.within_noise({"mean_error": 0.06, "worst_error": 0.12}, floor, opts)
    assert not ort_backend.within_noise({"mean_error": 0.01, "worst_error": 0.5}, floor, opts)
    assert not ort_backend.within_noise({"mean_error": 0.01, "worst_error": 0.1, "top1_agreement": 0.9}, floor, opts)
