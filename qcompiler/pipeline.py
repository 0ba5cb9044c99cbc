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

from qcompiler.errors import ConfigError
from qcompiler.ir.config import QConfig
from qcompiler.ir.passes import Pass
from qcompiler.ir.program import Program
from qcompiler.ir.target import Target

log = logging.getLogger("qcompiler.pipeline")


def targets() -> dict[str, type]:
    """The deployment targets by name (the face is the one floor that knows the backends)."""
    from qcompiler.backends.onnx_qdq import OnnxInt8Target

    return {OnnxInt8Target.name: OnnxInt8Target}


def get_target(config: QConfig) -> Target:
    """The target named by ``config.target``, configured from ``config``."""
    table = targets()
    if config.target not in table:
        raise ConfigError(f"unknown target {config.target!r}; choose one of {', '.join(sorted(table))}")
    return table[config.target](reduce_range=config.reduce_range)


def default_passes(config: QConfig, target: Target) -> list[Pass]:
    """The standard pipeline for ``config.method`` followed by the target's lowering and checks."""
    from qcompiler.passes import Calibrate, FoldBatchNorm, InsertQuantizers, Trace

    passes: list[Pass] = [Trace(), FoldBatchNorm(), InsertQuantizers(), Calibrate()]
    if config.method != "rtn":
        from qcompiler.passes.partition import Partition
        from qcompiler.passes.reconstruct import Reconstruct

        passes += [Partition(config.unit_granularity()), Reconstruct()]
        if config.qdrop_prob() >= 1.0:  # activations stayed float while reconstructing: calibrate them now
            passes.append(Calibrate(weights=False))
    return passes + list(target.lowering_passes())


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
