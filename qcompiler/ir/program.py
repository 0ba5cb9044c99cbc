"""The Program: everything the passes share.

- ``model``: the user's ``nn.Module`` (never modified).
- ``example_inputs``: a tuple of tensors used for capture and export; ``dynamic_dims``: per input
  (position or keyword) the dimensions that vary at run time (default: the batch dimension).
- ``calib``: the calibration batches (each a tuple of tensors, or a dict of keyword tensors).
- ``verify``: batches the calibration never saw, for the target's check of the lowered model, and
  ``verify_source``, a sentence saying where they came from (it goes into the report).
- ``config``: the :class:`~qcompiler.config.CompileConfig` (each pass reads its stage's part).
- ``target``: the deployment :class:`~qcompiler.ir.target.Target` (``compile()`` picks it from the config).
- ``work_dir``: where long passes keep files that let a rerun resume (None: nowhere).
- ``gm``: the ``fx.GraphModule`` the passes rewrite (set by ``trace``).

What passes hand on, typed (a pass's ``requires`` checks the one it needs):

- ``state``: :class:`ProgramState`, facts about the graph (quantized layers, calibrated, ...).
- ``units``: the reconstruction units (set by ``partition``), None before.
- ``lowered``: :class:`Lowered`, the deployed artifact (set by the target's lowering), None before.
- ``checks``: what the target's checks found (integer kernels, agreement).
- ``report``: what ends up in report.json.

Per-node facts live in ``node.meta`` under these keys:

- ``qc.layer``: user-facing layer name of a compute op (module path of its weight).
- ``qc.quantizer``: on a quantizer's call_module node, ``"act"``, ``"weight"`` or ``"bias"``.
- ``qc.qspec``: on a quantizer's call_module node, its :class:`~qcompiler.quantizers.grid.QSpec`.
- ``qc.of``: on an activation quantizer's node, the name of the tensor it quantizes.
- ``qc.unit``: the reconstruction unit a node belongs to (set by ``partition``).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from qcompiler.config import CompileConfig
from qcompiler.ir.target import Target

Batch = tuple | dict


def call(module: nn.Module, batch: Batch) -> Any:
    """Call ``module`` on one batch: positional for tuples, keywords for dicts."""
    if isinstance(batch, dict):
        return module(**batch)
    return module(*batch)


def export_args(inputs: tuple | dict, module: nn.Module | None = None, dims: dict | None = None
                ) -> tuple[tuple, dict, tuple | dict]:
    """(args, kwargs, dynamic_shapes) to export ``module`` with a dynamic leading (batch) dimension,
    and for the inputs ``dims`` names (by position or keyword) the dimensions it lists.

    torch.export specialises a dimension whose example size is 0 or 1, so example tensors with a
    batch of 1 are repeated to a batch of 2 for export. A forward that takes ``*args`` gets its
    specs keyed by parameter name, the varargs' ones as one tuple, as torch.export matches them.
    """

    def two(t: object) -> object:
        if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == 1:
            return t.repeat(2, *([1] * (t.dim() - 1)))
        return t

    def spec(key: int | str, t: object) -> object:
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            return None
        return {d: torch.export.Dim.AUTO for d in (dims or {}).get(key, (0,))}

    if isinstance(inputs, dict):
        kwargs = {k: two(v) for k, v in inputs.items()}
        return (), kwargs, {k: spec(k, v) for k, v in kwargs.items()}
    args = tuple(two(a) for a in inputs)
    specs = tuple(spec(i, a) for i, a in enumerate(args))
    params = list(inspect.signature(module.forward).parameters.values()) if module is not None else []
    var = next((i for i, p in enumerate(params) if p.kind is inspect.Parameter.VAR_POSITIONAL), None)
    if var is None or var > len(specs):
        return args, {}, specs
    named = {p.name: s for p, s in zip(params[:var], specs, strict=False)}
    return args, {}, {**named, params[var].name: specs[var:]}


def flat_outputs(out: Any) -> list[torch.Tensor]:
    """The tensors of a model output (tensor, tuple, list, dict or dataclass-like), in order."""
    from torch.utils._pytree import tree_leaves

    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    return [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]


@dataclass
class Unit:
    """A reconstruction unit: a contiguous span of the graph ending at ``output``; ``inputs`` are the
    outside values it reads, ``layers`` the user-facing names of its compute ops."""

    name: str
    nodes: list[str]
    output: str
    inputs: list[str] = field(default_factory=list)
    layers: list[str] = field(default_factory=list)


@dataclass
class ProgramState:
    """Facts passes establish about the graph.

    - ``quantized_layers``: the compute layers ``insert_quantizers`` quantized, in graph order;
      ``float_layers``: the compute layers the plan keeps in float, with the reason;
    - ``calibrated``: every quantizer has its range (``calibrate``);
    - ``granularity``: how ``partition`` cut the units; ``block_ends``: the output of every block (the
      points where granularities are compared, whatever the units);
    - ``activations_learned``: reconstruction learned the activation quantizers (else they are
      calibrated again after it).
    """

    quantized_layers: list[str] = field(default_factory=list)
    float_layers: dict[str, str] = field(default_factory=dict)
    calibrated: bool = False
    granularity: str | None = None
    block_ends: list[str] = field(default_factory=list)
    activations_learned: bool = False


@dataclass
class Lowered:
    """The deployed artifact: ``onnx_bytes``, the graph it was exported from (``deploy_gm``) and,
    once the target's check ran, the fake-quant graph computed with the target's integer
    arithmetic (``integer_gm``)."""

    onnx_bytes: bytes
    deploy_gm: fx.GraphModule
    integer_gm: fx.GraphModule | None = None


@dataclass
class Program:
    model: nn.Module
    example_inputs: tuple
    calib: list[Batch]
    config: CompileConfig
    target: Target | None = None
    gm: fx.GraphModule | None = None
    source: str = "<model>"
    verify: list[Batch] = field(default_factory=list)
    verify_source: str = ""
    work_dir: str | None = None
    dynamic_dims: dict | None = None
    state: ProgramState = field(default_factory=ProgramState)
    units: list[Unit] | None = None
    lowered: Lowered | None = None
    checks: dict[str, Any] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)

    def quantizer_nodes(self, which: str | None = None) -> Iterator[fx.Node]:
        """The call_module nodes of the inserted quantizers (``which`` = ``"act"``/``"weight"``)."""
        assert self.gm is not None
        for node in self.gm.graph.nodes:
            q = node.meta.get("qc.quantizer")
            if q is not None and (which is None or q == which):
                yield node


def batch_size(batch: Batch) -> int:
    """The leading dimension of a batch's first tensor."""
    return int(_shapes(batch)[0][1].shape[0])


def _slice(batch: Batch, sl: slice) -> Batch:
    if isinstance(batch, dict):
        return {k: v[sl] if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return tuple(v[sl] if isinstance(v, torch.Tensor) else v for v in batch)


def split_holdout(batches: list[Batch], n: int) -> tuple[list[Batch], list[Batch]]:
    """``(first, last)``: the batches with their last ``n`` samples cut off, and those samples.

    A batch that straddles the cut is sliced along its leading dimension; order is kept.
    """
    total = sum(batch_size(b) for b in batches)
    if not 0 < n < total:
        raise ValueError(f"cannot hold out {n} of {total} samples")
    first: list[Batch] = []
    last: list[Batch] = []
    seen = 0
    for b in batches:
        size, cut = batch_size(b), total - n
        if seen + size <= cut:
            first.append(b)
        elif seen >= cut:
            last.append(b)
        else:
            first.append(_slice(b, slice(0, cut - seen)))
            last.append(_slice(b, slice(cut - seen, None)))
        seen += size
    return first, last


def _shapes(batch: Batch) -> list[tuple[str, torch.Tensor]]:
    items = batch.items() if isinstance(batch, dict) else enumerate(batch)
    return [(str(k), v) for k, v in items if isinstance(v, torch.Tensor)]


def run_calibration(module: nn.Module, program: Program, batches: Any = None) -> None:
    """Run ``module`` without gradients on ``batches`` (default: the calibration batches, which a
    progress bar may wrap); a batch the model fails on is a CalibrationDataError naming the model."""
    from qcompiler.errors import CalibrationDataError

    with torch.no_grad():
        for batch in program.calib if batches is None else batches:
            try:
                call(module, batch)
            except Exception as exc:  # noqa: BLE001 - report which data broke the model
                raise CalibrationDataError(f"{program.source}: the model failed on a calibration batch: "
                                           f"{type(exc).__name__}: {str(exc).splitlines()[0]}") from exc


def check_calibration(calib: list[Batch], example_inputs: tuple | dict, what: str = "calibration",
                      dims: dict | None = None) -> None:
    """Reject calibration (or verification) data that is empty, not finite, or shaped unlike the
    example inputs.

    Every tensor must match the example input at the same position (or key) in everything but
    the leading batch dimension and the dimensions ``dims`` declares dynamic for it (see
    ``export_args``), in dtype class (float vs integer), and be finite.
    """
    from qcompiler.errors import CalibrationDataError

    if not calib:
        raise CalibrationDataError(f"the {what} data is empty: it must hold at least one batch")
    ref = dict(_shapes(example_inputs))
    for i, batch in enumerate(calib):
        if not isinstance(batch, (tuple, dict)):
            raise CalibrationDataError(f"{what} batch {i} is a {type(batch).__name__}; "
                                       "each batch must be a tuple of inputs or a dict of keyword inputs")
        got = dict(_shapes(batch))
        if set(got) != set(ref):
            raise CalibrationDataError(f"{what} batch {i} has inputs {sorted(got)} but the model's example "
                                       f"inputs are {sorted(ref)}")
        for k, t in got.items():
            e = ref[k]
            free = set((dims or {}).get(int(k) if k.isdigit() else k, (0,))) | {0}
            fixed = [d for d in range(e.dim()) if d not in free]
            if t.dim() != e.dim() or any(t.shape[d] != e.shape[d] for d in fixed):
                raise CalibrationDataError(f"{what} batch {i} input {k} has shape {tuple(t.shape)} but the "
                                           f"model expects {('N',) + tuple(e.shape[1:])}")
            if t.dtype.is_floating_point != e.dtype.is_floating_point:
                raise CalibrationDataError(f"{what} batch {i} input {k} has dtype {t.dtype}, the model "
                                           f"expects {e.dtype}")
            if t.dtype.is_floating_point and not torch.isfinite(t).all():
                bad = int((~torch.isfinite(t)).sum())
                raise CalibrationDataError(f"{what} batch {i} input {k} contains {bad} NaN/Inf values; "
                                           "clean or re-preprocess the calibration data")
