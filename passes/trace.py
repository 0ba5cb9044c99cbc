"""trace: capture the model as an ``fx.GraphModule``.

Rule: try ``torch.fx.symbolic_trace`` (modules listed in ``leaf_modules`` stay opaque calls); if it
fails, or the traced graph does not reproduce the model's output on the example inputs, fall back
to ``torch.export.export(...).module()`` with a dynamic batch dimension. Both give an fx graph; the
log and the report say which path was taken and why. The user's model is never modified: the pass
captures a deep copy.
"""

from __future__ import annotations

import copy
import logging
import re
import traceback

import torch
from torch import fx, nn

from qcompiler.errors import CaptureError, PostconditionError, PreconditionError
from qcompiler.ir.passes import Pass, PassResult
from qcompiler.ir.program import Program, call, export_args, flat_outputs

log = logging.getLogger("qcompiler.trace")


class _LeafTracer(fx.Tracer):
    def __init__(self, leaf_types: tuple[type, ...]) -> None:
        super().__init__()
        self.leaf_types = leaf_types

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, self.leaf_types) or super().is_leaf_module(m, qualname)


def _where(exc: BaseException, source: str) -> str:
    """The most useful user-code location of an exception: a frame in the model file if any."""
    frames = traceback.extract_tb(exc.__traceback__)
    text = str(exc)
    for f in reversed(frames):
        if source and f.filename == source:
            return f"{f.filename}:{f.lineno} ({f.line})"
    m = re.findall(r'File "([^"]+)", line (\d+)', text)
    for path, line in reversed(m):
        if "site-packages" not in path and "/torch/" not in path:
            return f"{path}:{line}"
    for f in reversed(frames):
        if "site-packages" not in f.filename and "/torch/" not in f.filename and "qcompiler" not in f.filename:
            return f"{f.filename}:{f.lineno} ({f.line})"
    return "unknown location"


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:300]


def _outputs_match(gm: nn.Module, model: nn.Module, inputs: tuple | dict) -> bool:
    with torch.no_grad():
        ref = flat_outputs(call(model, inputs))
        got = flat_outputs(call(gm, inputs))
    return len(ref) == len(got) and all(
        a.shape == b.shape and torch.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in zip(ref, got, strict=True))


class Trace(Pass):
    """Capture ``program.model`` into ``program.gm`` (symbolic_trace, else torch.export)."""

    name = "trace"

    def __init__(self, leaf_modules: tuple[type, ...] = (), force: str | None = None) -> None:
        self.leaf_modules = tuple(leaf_modules)
        self.force = force  # "symbolic_trace" or "export" to skip the other path (tests, debugging)

    def requires(self, program: Program) -> None:
        if not isinstance(program.model, nn.Module):
            raise PreconditionError(f"{program.source}: build() must return a torch.nn.Module, "
                                    f"got {type(program.model).__name__}")
        if program.model.training:
            raise PreconditionError(f"{program.source}: the model is in training mode; build() must return "
                                    "model.eval() so BatchNorm and Dropout behave as deployed")

    def run(self, program: Program) -> PassResult:
        model = copy.deepcopy(program.model).eval()
        inputs = program.example_inputs
        reasons: dict[str, str] = {}
        if self.force != "export":
            try:
                gm = fx.GraphModule(model, _LeafTracer(self.leaf_modules).trace(model))
                if _outputs_match(gm, model, inputs):
                    return self._done(program, gm, "symbolic_trace", None)
                reasons["symbolic_trace"] = "the traced graph does not reproduce the model's outputs"
            except Exception as exc:  # noqa: BLE001 - any tracing failure means: try the next path
                reasons["symbolic_trace"] = f"{_first_line(exc)} at {_where(exc, program.source)}"
            log.info("symbolic_trace failed (%s); falling back to torch.export", reasons["symbolic_trace"])
        try:
            gm = _export(model, inputs, program.dynamic_dims)
            if not _outputs_match(gm, model, inputs):
                raise RuntimeError("the exported graph does not reproduce the model's outputs")
            return self._done(program, gm, "torch.export", reasons.get("symbolic_trace"))
        except Exception as exc:  # noqa: BLE001
            reasons["torch.export"] = f"{_first_line(exc)} at {_where(exc, program.source)}"
        detail = "; ".join(f"{k}: {v}" for k, v in reasons.items())
        raise CaptureError(f"could not capture {program.source}: {detail}. Make the failing line traceable "
                           "(no data-dependent Python control flow), or list the offending module as a leaf")

    def _done(self, program: Program, gm: fx.GraphModule, path: str, reason: str | None) -> PassResult:
        program.gm = gm
        program.report["capture"] = {"path": path, "fallback_reason": reason}
        log.info("captured %s with %s (%d nodes)", program.source, path, len(gm.graph.nodes))
        return PassResult(True, {"path": path, "nodes": len(gm.graph.nodes)})

    def ensures(self, program: Program) -> None:
        if not isinstance(program.gm, fx.GraphModule):
            raise PostconditionError("trace did not produce a GraphModule")


def _export(model: nn.Module, inputs: tuple | dict, dims: dict | None = None) -> fx.GraphModule:
    """torch.export with a dynamic leading (batch) dimension and the ``dims`` asked for, as a plain
    GraphModule."""
    args, kwargs, dyn = export_args(inputs, model, dims)
    ep = torch.export.export(model, args, kwargs or None, dynamic_shapes=dyn)
    gm = ep.module()
    # Guard checks of the export (e.g. the example batch size) are not part of the model's computation.
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and "guards" in str(node.target) and not node.users:
            gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm
