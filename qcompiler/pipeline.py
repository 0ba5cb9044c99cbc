"""Pipeline: run passes in order, checking each pass's contract, timing and logging it.

    from qcompiler import Pipeline
    from qcompiler.passes import Trace, FoldBatchNorm
    Pipeline([Trace(), FoldBatchNorm()]).run(program)

``stop_after`` ends the run after the named pass (tests and the Python API use it to inspect a
program mid-way).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from qcompiler.config import CompileConfig
from qcompiler.errors import ConfigError
from qcompiler.ir.passes import Pass
from qcompiler.ir.program import Program
from qcompiler.ir.target import Target
from qcompiler.methods import METHODS

log = logging.getLogger("qcompiler.pipeline")


def targets() -> dict[str, type]:
    """The deployment targets by name (the face is the one floor that knows the backends)."""
    from qcompiler.backends.onnx_fp import OnnxFpTarget
    from qcompiler.backends.onnx_qdq import OnnxInt8Target

    return {OnnxInt8Target.name: OnnxInt8Target, OnnxFpTarget.name: OnnxFpTarget}


def get_target(config: CompileConfig) -> Target:
    """The target named by ``config.target``, given its options."""
    table = targets()
    if config.target not in table:
        raise ConfigError(f"unknown target {config.target!r}; choose one of {', '.join(sorted(table))}")
    return table[config.target](config.target_options)


def pass_table() -> dict[str, Callable[[], Pass]]:
    """The passes a method's recipe names, by name."""
    from qcompiler.passes import (
        Calibrate,
        DecomposeAttention,
        FoldBatchNorm,
        InsertQuantizers,
        LinearForms,
        Mrecg,
        Partition,
        Reconstruct,
        SplitOutliers,
        Trace,
    )

    return {"trace": Trace, "decompose_attention": DecomposeAttention, "linear_forms": LinearForms,
            "fold_bn": FoldBatchNorm, "split_outliers": SplitOutliers, "insert_quantizers": InsertQuantizers,
            "calibrate": Calibrate, "partition": Partition, "mrecg": Mrecg, "reconstruct": Reconstruct,
            "recalibrate": lambda: Calibrate(weights=False)}


def default_passes(config: CompileConfig, target: Target) -> list[Pass]:
    """The passes of ``config.method``'s recipe followed by the target's lowering and checks."""
    from qcompiler.quantizers import family

    method = METHODS[config.method]
    table = pass_table()
    unknown = [n for n in method.passes if n not in table]
    if unknown:
        raise ConfigError(f"method {method.name!r} names unknown pass(es) {unknown}; known: {', '.join(table)}")
    if config.quant.a_bits is None and not target.placement().float_quantizers:
        raise ConfigError(f"target {target.name} runs integer kernels, which need quantized activations; weights-only "
                          f"bits ({config.quant.bits}) compile for a target that computes in float (--target onnx-fp)")
    for kind, name in (("weight", config.recon.weight_quantizer), ("activation", config.recon.act_quantizer)):
        if not getattr(family(name), "integer_form", True) and not target.placement().float_quantizers:
            raise ConfigError(f"target {target.name} runs integer kernels and {name} {kind} quantizers have no "
                              f"integer form; choose a target that simulates them in float (--target onnx-fp)"
                              + (" or --method mrbiq-uniform, which lowers to integers" if name == "mrbiq" else ""))
    return [table[n]() for n in method.passes] + list(target.lowering_passes())


class Pipeline:
    """An ordered list of passes run over one Program."""

    def __init__(self, passes: list[Pass], stop_after: str | None = None) -> None:
        names = [p.name for p in passes]
        if stop_after is not None and stop_after not in names:
            raise ConfigError(f"stop_after={stop_after!r} names no pass of this pipeline ({', '.join(names)})")
        self.passes = list(passes)
        self.stop_after = stop_after

    def run(self, program: Program) -> Program:
        records = program.report.setdefault("passes", [])
        for p in self.passes:
            p.requires(program)
            t0 = time.perf_counter()
            result = p.run(program)
            p.ensures(program)
            dt = time.perf_counter() - t0
            records.append({"pass": p.name, "seconds": round(dt, 3), "changed": result.changed, **result.stats})
            log.info("%-18s %6.2fs %s", p.name, dt, " ".join(f"{k}={v}" for k, v in result.stats.items()))
            if p.name == self.stop_after:
                break
        return program
