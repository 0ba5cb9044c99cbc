"""ort: ONNX Runtime sessions, the integer-kernel check, the agreement check, latency.

Rules of the checks that end every compile (a failure is an error, not a warning):

- Integer kernels: in the graph ONNX Runtime actually runs (optimised at ORT_ENABLE_ALL) there must
  be at least one integer kernel (QLinearConv, ConvInteger, QLinearMatMul, MatMulInteger, QGemm, ...)
  per compute layer planned as quantized, and no more float Conv/Gemm/MatMul than the layers the
  plan keeps in float (``ProgramState.float_layers``, listed with their reasons in the report).
- Agreement: on inputs calibration never saw (``program.verify``), ORT's outputs must match the
  fake-quant torch model: top-1 agreement >= ``min_agreement`` for classifier-shaped outputs, and
  every sample within a relative error of ``max_error`` (``TargetOptions``). Where that fails and
  ORT runs no kernel the fake-quant model leaves unmodelled, the disagreement is accepted if it is
  no larger than the fake-quant model's own with its float operations off by a float32 rounding or
  its convolutions run by other kernels (the worst of a few such runs: :func:`noise_floor`,
  :func:`within_noise`); the report says so (``accepted_by``).
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
from torch import fx

from qcompiler.backends.ort_numerics import EMULATED, integer_exact
from qcompiler.config import TargetOptions
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


def check_integer_kernels(model: bytes, expected_layers: int, float_layers: dict[str, str] | None = None
                          ) -> dict[str, Any]:
    """Check every compute layer planned as quantized runs as an integer kernel (and only the
    ``float_layers`` of the plan in float); raise VerificationError if not.

    The result also lists ``unmodelled``: quantized kernels ORT runs that the fake-quant model does not
    compute with ORT's arithmetic (:data:`~qcompiler.backends.ort_numerics.EMULATED`).
    """
    counts = optimized_op_counts(model)
    floats = {k: v for k, v in counts.items() if k in FLOAT_COMPUTE}
    ints = {k: v for k, v in counts.items() if k in INT_COMPUTE}
    unmodelled = sorted(k for k in counts if (k in INT_COMPUTE or k.startswith("QLinear")) and k not in EMULATED)
    planned = dict(float_layers or {})
    result = {"integer_kernels": ints, "float_kernels": floats, "expected": expected_layers, "kept_float": planned,
              "unmodelled": unmodelled,
              "ok": sum(floats.values()) <= len(planned) and sum(ints.values()) >= expected_layers}
    if not result["ok"]:
        raise VerificationError(
            f"ONNX Runtime runs {sum(floats.values())} float compute op(s) {floats} and {sum(ints.values())} integer "
            f"kernel(s) {ints} for {expected_layers} layers planned as quantized and {len(planned)} kept float: a "
            "planned QDQ pattern did not fuse into an integer kernel")
    return result


def agreement(ref: list[torch.Tensor], got: list[torch.Tensor]) -> dict[str, float]:
    """How ``got`` (ORT) matches ``ref`` (fake-quant), per output then over outputs.

    ``error``: per sample, the relative error ``||got - ref|| / ||ref||`` (the largest over outputs;
    0 where both are all zero); ``mean_error``, ``worst_error`` and ``worst_sample`` (its index);
    ``cosine``: the lowest output's mean cosine similarity; ``max_abs_diff``; ``top1_agreement`` for a
    classifier-shaped first output (N x classes). Unlike the cosine, the error also sees a rescaled
    output.
    """
    out: dict[str, float] = {}
    errors, cosines = None, []
    maxabs = 0.0
    for r, g in zip(ref, got, strict=True):
        r, g = r.double().reshape(r.shape[0], -1), g.double().reshape(g.shape[0], -1)
        diff = (g - r).norm(dim=1)
        e = torch.where(diff == 0, torch.zeros_like(diff), diff / r.norm(dim=1))
        errors = e if errors is None else torch.maximum(errors, e)
        cosines.append(float(torch.nn.functional.cosine_similarity(r, g, dim=1, eps=1e-12).mean()))
        maxabs = max(maxabs, float((r - g).abs().max()) if r.numel() else 0.0)
    if errors is None or errors.numel() == 0:
        raise VerificationError("the verification produced no outputs to compare")
    out["mean_error"] = float(errors.mean())
    out["worst_error"] = float(errors.max())
    out["worst_sample"] = int(errors.argmax())
    out["cosine"] = min(cosines)
    out["max_abs_diff"] = maxabs
    r0 = ref[0]
    if r0.dim() == 2 and r0.shape[1] > 1:
        out["top1_agreement"] = float((r0.argmax(1) == got[0].argmax(1)).float().mean())
    return out


def outputs(run: Callable[[Batch], Any], batches: list[Batch]) -> list[torch.Tensor]:
    """``run``'s outputs over ``batches``, each output concatenated along the batch."""
    with torch.no_grad():
        per_batch = [flat_outputs(run(b)) for b in batches]
    return [torch.cat([o[i] for o in per_batch]) for i in range(len(per_batch[0]))]


def compare(model: torch.nn.Module, sess: ort.InferenceSession, batches: list[Batch],
            ref: list[torch.Tensor] | None = None) -> dict[str, float]:
    """Run the fake-quant model (unless its outputs ``ref`` are given) and the ORT session on
    ``batches``; summarise how they agree."""
    ref = ref if ref is not None else outputs(lambda b: call(model, b), batches)
    got = outputs(lambda b: [torch.from_numpy(o) for o in sess.run(None, feeds(sess, b))], batches)
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


#: Perturbed runs the noise floor takes the worst of: whether a float difference flips a whole step
#: somewhere is a matter of chance, so one run's worst sample varies widely with its seed
#: (bench/noise_floor.py).
FLOOR_RUNS = 3


class _Perturbed(fx.Interpreter):
    """Runs a graph with every float call_function/call_method result off by a random relative 2^-23."""

    def __init__(self, gm: fx.GraphModule, gen: torch.Generator) -> None:
        super().__init__(gm)
        self.gen = gen

    def run_node(self, n: fx.Node):  # noqa: ANN202
        out = super().run_node(n)
        if n.op in ("call_function", "call_method") and isinstance(out, torch.Tensor) and out.is_floating_point():
            u = torch.rand(out.shape, generator=self.gen, dtype=out.dtype) * 2 - 1
            out = out * (1 + u * 2.0**-23)
        return out


def noise_floor_run(model: fx.GraphModule, batches: list[Batch], ref: list[torch.Tensor],
                    seed: int) -> dict[str, float]:
    """The agreement metrics against ``ref`` of one run of ``model`` with every float operation's
    result (LayerNorm, GELU, softmax, ...) off by about one float32 rounding, drawn with ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    return agreement(ref, outputs(lambda b: _Perturbed(model, gen).run(*(b.values() if isinstance(b, dict) else b)),
                                  batches))


def noise_floor(model: fx.GraphModule, batches: list[Batch], ref: list[torch.Tensor] | None = None,
                runs: int = FLOOR_RUNS) -> dict[str, float]:
    """How far the fake-quant graph ``model`` moves from itself under float differences no runtime
    avoids, turned into whole-step flips now and then by the quantizers after them and compounded
    through a deep network: ``runs`` perturbed runs (:func:`noise_floor_run`, seeds 0, 1, ...) and
    one run with torch's reference convolution kernels instead of its oneDNN ones (another
    accumulation order, as ORT's kernels have). Against the plain run (``ref``, computed when not
    given): each agreement metric at its worst over the runs."""
    ref = ref if ref is not None else outputs(lambda b: call(model, b), batches)
    with torch.backends.mkldnn.flags(enabled=False):
        reference_kernels = agreement(ref, outputs(lambda b: call(model, b), batches))
    worst: dict[str, float] = {}
    for run in (*(noise_floor_run(model, batches, ref, seed) for seed in range(runs)), reference_kernels):
        if not worst or run["worst_error"] > worst["worst_error"]:
            worst.update(worst_error=run["worst_error"], worst_sample=run["worst_sample"])
        for k, pick in (("mean_error", max), ("max_abs_diff", max), ("cosine", min), ("top1_agreement", min)):
            if k in run:
                worst[k] = pick(worst[k], run[k]) if k in worst else run[k]
    return worst


def within_noise(agree: dict, floor: dict, cfg: TargetOptions) -> bool:
    """ORT's disagreement is what the fake-quant model shows against itself (``noise_floor``): its
    mean and worst relative errors at most twice the floor's (plus ``max_error``), its top-1
    agreement at most ``1 - min_agreement`` below the floor's."""
    top1, ftop1 = agree.get("top1_agreement"), floor.get("top1_agreement")
    return (agree["mean_error"] <= 2 * floor["mean_error"] + cfg.max_error
            and agree["worst_error"] <= 2 * floor["worst_error"] + cfg.max_error
            and (top1 is None or ftop1 is None or top1 >= ftop1 - (1 - cfg.min_agreement)))


class VerifyOrt(Pass):
    """Check the lowered model in ONNX Runtime: integer kernels present, outputs agree.

    Rule: on ``program.verify`` (inputs calibration never saw; at most ``options.verify_samples``
    samples) ORT's top-1 agrees with the fake-quant model's on at least ``options.min_agreement``
    of the samples and no sample's output is further than ``options.max_error`` (relative) from the
    fake-quant one. Failing either is a VerificationError. The fake-quant model is computed with ORT's
    integer arithmetic (:func:`~qcompiler.backends.ort_numerics.integer_exact`, kept as
    ``program.lowered.integer_gm``): on this CPU's kernels the two agree bit for bit, so any difference
    is a lowering that computes something else.
    """

    name = "verify_ort"

    def __init__(self, options: TargetOptions | None = None, integer: bool = True) -> None:
        self.options = options or TargetOptions()
        self.integer = integer  # False: a float-simulation target, checked against the float fake-quant model

    def requires(self, program: Program) -> None:
        if program.lowered is None:
            raise PreconditionError("verify_ort needs a lowered model: run lower_onnx_qdq first")
        if not program.verify:
            raise PreconditionError("verify_ort needs verification inputs (program.verify): inputs the "
                                    "calibration did not see")

    def run(self, program: Program) -> PassResult:
        cfg = self.options
        data = program.lowered.onnx_bytes
        if self.integer:
            kernels = check_integer_kernels(data, len(program.state.quantized_layers), program.state.float_layers)
            ref = program.lowered.integer_gm = integer_exact(program.gm)
        else:
            counts = optimized_op_counts(data)
            kernels = {"integer_kernels": {k: v for k, v in counts.items() if k in INT_COMPUTE},
                       "float_kernels": {k: v for k, v in counts.items() if k in FLOAT_COMPUTE}, "expected": 0,
                       "unmodelled": [], "ok": True, "plan": "float simulation: compute ops run in float"}
            ref = program.gm
        sess = session(data)
        batches = take_samples(program.verify, cfg.verify_samples)
        ref_out = outputs(lambda b: call(ref, b), batches)
        agree = compare(ref, sess, batches, ref_out)
        agree["integer_kernels_emulated"] = ref.meta.get("qc.integer_kernels", 0)
        agree["inputs"] = program.verify_source
        checks = program.checks
        checks["integer_kernels"] = kernels
        checks["agreement"] = agree
        top1 = agree.get("top1_agreement")
        strict = not ((top1 is not None and top1 < cfg.min_agreement) or not agree["worst_error"] <= cfg.max_error)
        if not strict and not kernels["unmodelled"]:
            agree["noise_floor"] = floor = noise_floor(ref, batches, ref_out)
            strict = within_noise(agree, floor, cfg)
            agree["accepted_by"] = "noise floor" if strict else None
        if not strict:
            top1_text = "n/a" if top1 is None else f"{top1:.4f}"
            hint = "" if not kernels["unmodelled"] else (
                f"; ORT also runs {', '.join(kernels['unmodelled'])}, which the fake-quant model does not compute "
                "with ORT's rounding: if that is all, a looser --max-error accepts it")
            raise VerificationError(
                f"ONNX Runtime disagrees with the fake-quant model on {agree['samples']} verification samples "
                f"({program.verify_source}): top-1 agreement {top1_text} (need >= {cfg.min_agreement}), worst "
                f"sample {agree['worst_sample']} off by {agree['worst_error']:.4g} relative (need <= {cfg.max_error})"
                f"{hint}")
        log.info("ORT check: %s integer kernels, agreement %s", kernels["integer_kernels"], agree)
        return PassResult(False, {"integer_kernels": sum(kernels["integer_kernels"].values()),
                                  **{k: v for k, v in agree.items() if k != "inputs"}})
