"""ort: ONNX Runtime sessions, the integer-kernel check, the agreement check, latency.

Rules of the checks that end every compile (a failure is an error, not a warning):

- Integer kernels: in the graph ONNX Runtime actually runs (optimised at ORT_ENABLE_ALL), no float
  Conv/Gemm/MatMul may remain and there must be at least one integer kernel (QLinearConv,
  ConvInteger, QLinearMatMul, MatMulInteger, QGemm, ...) per quantized compute layer.
- Agreement: on calibration inputs, ORT's outputs must match the fake-quant torch model: top-1
  agreement >= ``config.min_agreement`` for classifier-shaped outputs, and cosine similarity
  >= 0.98 for every output.
"""

from __future__ import annotations

import collections
import logging
import os
import tempfile
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

from qcompiler.errors import PreconditionError, VerificationError
from qcompiler.ir.passes import Pass, PassResult
from qcompiler.ir.program import Batch, Program, call, flat_outputs

log = logging.getLogger("qcompiler.ort")

FLOAT_COMPUTE = {"Conv", "FusedConv", "NchwcConv", "Gemm", "FusedGemm", "MatMul", "FusedMatMul", "ConvTranspose"}
INT_COMPUTE = {"QLinearConv", "ConvInteger", "QLinearMatMul", "MatMulInteger", "QGemm", "MatMulIntegerToFloat",
               "DynamicQuantizeMatMul", "QLinearConvTranspose", "NhwcQLinearConv"}


def session(model: bytes | str, threads: int = 2, level: str = "all",
            optimized_path: str | None = None) -> ort.InferenceSession:
    """An ONNX Runtime CPU session with ``threads`` intra-op threads."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    }[level]
    so.log_severity_level = 3
    if optimized_path:
        so.optimized_model_filepath = optimized_path
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def feeds(sess: ort.InferenceSession, batch: Batch) -> dict[str, np.ndarray]:
    """Map a batch (tuple in forward order, or dict by name) to the session's input names."""
    names = [i.name for i in sess.get_inputs()]
    if isinstance(batch, dict):
        missing = [n for n in names if n not in batch]
        if missing:
            raise PreconditionError(f"batch lacks ONNX inputs {missing}")
        return {n: batch[n].detach().cpu().numpy() for n in names}
    tensors = [t for t in batch if isinstance(t, torch.Tensor)]
    return {n: t.detach().cpu().numpy() for n, t in zip(names, tensors, strict=False)}


def runner(sess: ort.InferenceSession) -> Callable[[Batch], torch.Tensor]:
    """A callable mapping one batch to the session's first output as a torch tensor."""
    def run(batch: Batch) -> torch.Tensor:
        return torch.from_numpy(sess.run(None, feeds(sess, batch))[0])
    return run


def optimized_op_counts(model: bytes) -> collections.Counter:
    """Op-type histogram of the graph ONNX Runtime runs after ORT_ENABLE_ALL optimisation."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "optimized.onnx")
        session(model, optimized_path=path)
        opt = onnx.load(path)
    return collections.Counter(n.op_type for n in opt.graph.node)


def check_integer_kernels(model: bytes, expected_layers: int) -> dict[str, Any]:
    """Check every quantized compute layer runs as an integer kernel; raise VerificationError if not."""
    counts = optimized_op_counts(model)
    floats = {k: v for k, v in counts.items() if k in FLOAT_COMPUTE}
    ints = {k: v for k, v in counts.items() if k in INT_COMPUTE}
    result = {"integer_kernels": ints, "float_kernels": floats, "expected": expected_layers,
              "ok": not floats and sum(ints.values()) >= expected_layers}
    if not result["ok"]:
        raise VerificationError(
            f"ONNX Runtime runs {sum(floats.values())} float compute op(s) {floats} and {sum(ints.values())} integer "
            f"kernel(s) {ints} for {expected_layers} quantized layers: the QDQ pattern did not fuse")
    return result


def agreement(ref: list[torch.Tensor], got: list[torch.Tensor]) -> dict[str, float]:
    """Top-1 agreement (classifier-shaped outputs), cosine similarity and max abs difference."""
    out: dict[str, float] = {}
    cos, maxabs = [], 0.0
    for r, g in zip(ref, got, strict=True):
        r, g = r.float().reshape(r.shape[0], -1), g.float().reshape(g.shape[0], -1)
        cos.append(float(torch.nn.functional.cosine_similarity(r, g, dim=1, eps=1e-12).mean()))
        maxabs = max(maxabs, float((r - g).abs().max()))
    out["cosine"] = min(cos) if cos else 1.0
    out["max_abs_diff"] = maxabs
    r0 = ref[0]
    if r0.dim() == 2 and r0.shape[1] > 1:
        out["top1_agreement"] = float((r0.argmax(1) == got[0].argmax(1)).float().mean())
    return out


def compare(program: Program, sess: ort.InferenceSession, batches: list[Batch]) -> dict[str, float]:
    """Run the fake-quant graph and the ORT session on ``batches``; summarise how they agree."""
    refs: list[list[torch.Tensor]] = []
    gots: list[list[torch.Tensor]] = []
    with torch.no_grad():
        for b in batches:
            refs.append(flat_outputs(call(program.gm, b)))
            gots.append([torch.from_numpy(o) for o in sess.run(None, feeds(sess, b))])
    ref = [torch.cat([r[i] for r in refs]) for i in range(len(refs[0]))]
    got = [torch.cat([g[i] for g in gots]) for i in range(len(gots[0]))]
    if len(ref) != len(got) or any(a.shape != b.shape for a, b in zip(ref, got, strict=False)):
        raise VerificationError(f"ORT outputs {[tuple(g.shape) for g in got]} differ in shape from the model's "
                                f"{[tuple(r.shape) for r in ref]}")
    res = agreement(ref, got)
    res["samples"] = int(ref[0].shape[0])
    return res


def take_samples(batches: list[Batch], n: int) -> list[Batch]:
    """The leading batches of ``batches`` holding about ``n`` samples."""
    out, count = [], 0
    for b in batches:
        if count >= n:
            break
        out.append(b)
        first = next(iter(b.values())) if isinstance(b, dict) else b[0]
        count += int(first.shape[0])
    return out


class VerifyOrt(Pass):
    """Check the lowered model in ONNX Runtime: integer kernels present, outputs agree."""

    name = "verify_ort"

    def requires(self, program: Program) -> None:
        if "onnx_bytes" not in program.artifacts:
            raise PreconditionError("verify_ort needs a lowered model: run lower_onnx_qdq first")

    def run(self, program: Program) -> PassResult:
        data = program.artifacts["onnx_bytes"]
        kernels = check_integer_kernels(data, len(program.artifacts.get("quantized_layers", [])))
        sess = session(data)
        agree = compare(program, sess, take_samples(program.calib, program.config.verify_samples))
        checks = program.artifacts.setdefault("checks", {})
        checks["integer_kernels"] = kernels
        checks["agreement"] = agree
        top1 = agree.get("top1_agreement")
        if (top1 is not None and top1 < program.config.min_agreement) or agree["cosine"] < 0.98:
            raise VerificationError(
                f"ONNX Runtime disagrees with the fake-quant model on {agree['samples']} calibration samples: "
                f"top-1 agreement {top1}, cosine {agree['cosine']:.4f} (need >= {program.config.min_agreement} "
                "and >= 0.98)")
        log.info("ORT check: %s integer kernels, agreement %s", kernels["integer_kernels"], agree)
        return PassResult(False, {"integer_kernels": sum(kernels["integer_kernels"].values()), **agree})

