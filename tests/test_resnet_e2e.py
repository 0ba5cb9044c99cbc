"""ResNet-20 end to end: accuracy, ORT vs fake-quant agreement, integer kernels, size, the 4-bit clamp."""

from __future__ import annotations

import onnx
import torch

from qcompiler.backends import ort as ort_backend

from conftest import assert_ort_equals_fake_quant

# ResNet-20 W4A4 round to nearest gives 78.18 on test10k (bench/results/accuracy_resnet20.md).
W4A4_RTN_FLOOR = 77.5


def _record(run, store: list):
    def wrapped(batch):
        out = run(batch)
        store.append(out.detach().float())
        return out
    return wrapped


def _ort_and_fq(result, evaluate):
    """Evaluate ORT and the fake-quant graph on the model file's evaluation set; return both + agreement."""
    sess = ort_backend.session(result.onnx_bytes)
    ort_out, fq_out = [], []
    with torch.no_grad():
        m_ort = evaluate(_record(ort_backend.runner(sess), ort_out))
        m_fq = evaluate(_record(lambda b: result.fake_quant(*b), fq_out))
    a, b = torch.cat(ort_out), torch.cat(fq_out)
    agree = float((a.argmax(1) == b.argmax(1)).float().mean())
    return m_ort, m_fq, agree


def test_w8a8_accuracy_and_agreement_on_test10k(compiled, resnet_file, shared_cifar):
    r = compiled("resnet_cifar.py", bits="w8a8")
    m_ort, m_fq, agree = _ort_and_fq(r, resnet_file.evaluate)
    assert m_ort["n"] == 10000
    assert m_ort["top1"] >= 80.7, m_ort          # float 81.03
    assert agree == 1.0 and m_fq == m_ort, (agree, m_fq, m_ort)


def test_w4a4_agreement_on_test10k(compiled, resnet_file, shared_cifar):
    r = compiled("resnet_cifar.py", bits="w4a4")
    m_ort, m_fq, agree = _ort_and_fq(r, resnet_file.evaluate)
    assert agree == 1.0 and m_fq == m_ort, (agree, m_fq, m_ort)
    assert m_ort["top1"] > W4A4_RTN_FLOOR, m_ort


def test_every_conv_and_gemm_runs_as_integer_kernel(compiled):
    r = compiled("resnet_cifar.py", bits="w8a8")
    counts = ort_backend.optimized_op_counts(r.onnx_bytes)
    assert counts["QLinearConv"] == 19 and counts["QGemm"] + counts["QLinearMatMul"] == 1, counts
    assert not set(counts) & ort_backend.FLOAT_COMPUTE, counts
    assert r.checks["integer_kernels"]["ok"]
    assert_ort_equals_fake_quant(r, (torch.randn(64, 3, 32, 32),))


def test_weights_stored_as_integers_and_size(compiled):
    r = compiled("resnet_cifar.py", bits="w8a8")
    model = onnx.load_from_string(r.onnx_bytes)
    weights = [t for t in model.graph.initializer if len(t.dims) == 4]
    assert len(weights) == 19 and all(t.data_type == onnx.TensorProto.INT8 for t in weights)
    float_params = sum(p.numel() * 4 for p in r.program.model.parameters())
    assert len(r.onnx_bytes) <= 0.35 * float_params, (len(r.onnx_bytes), float_params)


def _clip_bounds(model: onnx.ModelProto) -> list[tuple[int, int]]:
    init = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    consts = {n.output[0]: onnx.numpy_helper.to_array(n.attribute[0].t) for n in model.graph.node
              if n.op_type == "Constant"}
    init.update(consts)
    producers = {o: n for n in model.graph.node for o in n.output}
    out = []
    for n in model.graph.node:
        if n.op_type == "Clip" and producers[n.input[0]].op_type == "QuantizeLinear":
            out.append((int(init[n.input[1]]), int(init[n.input[2]])))
    return out


def test_4bit_clamp_survives_lowering(compiled):
    """Every 4-bit activation keeps Q -> Clip(0..15) -> DQ, and ORT output honours it."""
    r = compiled("resnet_cifar.py", bits="w4a4")
    model = onnx.load_from_string(r.onnx_bytes)
    four_bit = [n for n in r.program.quantizer_nodes("act") if n.meta["qc.qspec"].bits == 4]
    bounds = _clip_bounds(model)
    assert len(bounds) == len(four_bit) == 18  # the inputs of the 18 4-bit convs
    assert all(0 <= lo and hi <= 15 for lo, hi in bounds), bounds
    # Weights: each channel's stored integers span at most the 16 levels of a 4-bit grid.
    for t in model.graph.initializer:
        if len(t.dims) == 4 and t.dims[1] > 3:  # all but the 8-bit first conv
            w = onnx.numpy_helper.to_array(t).reshape(t.dims[0], -1).astype(int)
            assert (w.max(1) - w.min(1)).max() <= 15 and abs(w).max() <= 15


def test_asymmetric_weights_run_as_integer_kernels_with_zero_zero_points(compiled):
    """Per-channel asymmetric weights (the default) are stored centered: int8, zero point 0, QLinearConv."""
    r = compiled("resnet_cifar.py", bits="w4a4")
    specs = [n.meta["qc.qspec"] for n in r.program.quantizer_nodes("weight")]
    assert sum(s.centered for s in specs) == 18 and all(s.centered or s.symmetric for s in specs), specs
    quantizers = [r.program.gm.get_submodule(n.target) for n in r.program.quantizer_nodes("weight")]
    zps = [q.zero_point for q in quantizers if q.spec.centered]
    assert any(bool((z != 0).any()) for z in zps)  # the grids really are asymmetric
    model = onnx.load_from_string(r.onnx_bytes)
    init = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    weights = [v for v in init.values() if v.ndim == 4 and v.shape[1] > 3]  # all but the 8-bit first conv
    assert len(weights) == 18
    assert all(v.dtype.name == "int8" and int(v.min()) >= -15 and int(v.max()) <= 15 for v in weights)
    for n in model.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in init and init[n.input[0]].ndim == 4 and len(n.input) > 2:
            assert not init[n.input[2]].any()
    counts = ort_backend.optimized_op_counts(r.onnx_bytes)
    assert counts["QLinearConv"] == 19 and not set(counts) & ort_backend.FLOAT_COMPUTE, counts
    assert_ort_equals_fake_quant(r, (torch.randn(64, 3, 32, 32),))
