"""The Python API: ``qcompiler.compile`` and model-file loading.

    import qcompiler
    result = qcompiler.compile("models/resnet_cifar.py", bits="w4a4", output="r20.onnx")
    result.checks["agreement"]

A model file is Python code and runs as such when loaded: only compile model files you trust.
Everything else qcompiler loads (weights, calibration .npz) is read as data.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from qcompiler.config import parse_pairs, resolve
from qcompiler.errors import CalibrationDataError, ModelFileError, OutputError, QCompileError, VerificationError
from qcompiler.ir.program import Batch, Program, batch_size, call, check_calibration, split_holdout
from qcompiler.pipeline import Pipeline, default_passes, get_target
from qcompiler.recipe import dump_recipe, load_recipe

log = logging.getLogger("qcompiler")


def load_model_file(path: str | os.PathLike) -> ModuleType:
    """Import a model file (this runs its code) and check it defines the contract's functions."""
    p = Path(path)
    if not p.is_file():
        raise ModelFileError(f"model file {p} does not exist")
    name = f"qcompiler_model_{p.stem}"
    spec = importlib.util.spec_from_file_location(name, p)
    if spec is None or spec.loader is None:
        raise ModelFileError(f"{p} is not a Python file")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    try:
        spec.loader.exec_module(mod)
    except Exception as exc:  # noqa: BLE001 - a broken model file is the user's error to fix
        raise ModelFileError(f"{p}: importing the model file failed: {type(exc).__name__}: {exc}") from exc
    missing = [f for f in ("build", "example_inputs", "calibration_data") if not callable(getattr(mod, f, None))]
    if missing:
        raise ModelFileError(f"{p} does not define {', '.join(f + '()' for f in missing)}; a model file needs "
                             "build(), example_inputs() and calibration_data() (evaluate() is optional)")
    return mod


def _call_with(fn: Callable, where: str, kwargs: dict[str, Any]) -> Any:
    """Call ``fn`` with the keyword arguments it accepts; wrap its failure in a ModelFileError."""
    params = inspect.signature(fn).parameters
    takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    use = {k: v for k, v in kwargs.items() if takes_all or k in params}
    try:
        return fn(**use)
    except QCompileError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise ModelFileError(f"{where}: {fn.__name__}({', '.join(f'{k}={v!r}' for k, v in use.items())}) failed: "
                             f"{type(exc).__name__}: {exc}") from exc


def _as_batches(data: Any) -> list[Batch]:
    out: list[Batch] = []
    for b in data:
        if isinstance(b, torch.Tensor):
            b = (b,)
        elif isinstance(b, list):
            b = tuple(b)
        out.append(b)
    return out


def fake_quant_model(program: Program) -> nn.Module:
    """The fake-quant model: computed with the target's integer arithmetic when the target's check
    made that version (``program.lowered.integer_gm``), else the graph as the passes left it."""
    if program.lowered is not None and program.lowered.integer_gm is not None:
        return program.lowered.integer_gm
    return program.gm


@dataclass
class CompileResult:
    """What a compile produced: the program (fake-quant graph), the ONNX path, report and metrics."""

    program: Program
    output: Path | None
    report: dict[str, Any]
    metrics: dict[str, dict] = field(default_factory=dict)

    @property
    def checks(self) -> dict[str, Any]:
        return self.program.checks

    @property
    def fake_quant(self) -> nn.Module:
        """The fake-quant model (see :func:`fake_quant_model`)."""
        return fake_quant_model(self.program)

    @property
    def onnx_bytes(self) -> bytes:
        return self.program.lowered.onnx_bytes


def check_output_path(path: str | os.PathLike) -> Path:
    """Fail early (before any long work) if ``path`` cannot be written."""
    p = Path(path)
    if p.is_dir():
        raise OutputError(f"output {p} is a directory; give a file name such as {p / 'model.onnx'}")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"cannot write {p}: directory {parent} does not exist")
    try:
        fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{p.name}.", suffix=".tmp")
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        raise OutputError(f"cannot write {p}: {exc.strerror}") from exc
    return p


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file and rename, so no half-written file is ever left."""
    fd, tmp = tempfile.mkstemp(dir=path.parent if str(path.parent) else ".", prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def compile(  # noqa: A001 - the public name of the API
    model: str | os.PathLike | nn.Module,
    *,
    output: str | os.PathLike | None = None,
    example_inputs: tuple | dict | None = None,
    calib: list | None = None,
    calib_path: str | None = None,
    verify_data: list | None = None,
    dynamic_dims: dict | None = None,
    model_args: dict[str, Any] | None = None,
    evaluate: bool = False,
    report_dir: str | os.PathLike | None = None,
    recipe: str | os.PathLike | dict | None = None,
    work_dir: str | os.PathLike | None = None,
    passes: list | None = None,
    stop_after: str | None = None,
    **options: Any,
) -> CompileResult:
    """Quantize ``model`` (a model-file path, or a module with ``example_inputs`` and ``calib``).

    ``options`` are knobs of :mod:`qcompiler.config` (``bits="w4a4"``, ``method="qdrop"``,
    ``iters=2000``, ``overrides={"fc": "w8a8"}`` ...); ``recipe`` (a TOML path or a dict) gives
    knobs too, and ``options`` win over it. Runs the method's passes (:mod:`qcompiler.methods`), the
    target's lowering and checks; writes ``output`` atomically; returns a :class:`CompileResult`.
    The checks run on inputs calibration never saw (see :func:`verification_split`).
    ``dynamic_dims`` (or the model file's optional ``dynamic_dims()``) maps an input's position or
    name to the dimensions that vary at run time (default: only the batch dimension, 0).
    ``stop_after`` ends the pipeline after the named pass (nothing is written then); an ``output``
    is written only when the target's checks ran and passed. ``report_dir`` receives report.json,
    summary.md and the resolved recipe.toml; reconstruction checkpoints go to ``work_dir``
    (default: ``report_dir``).
    """
    t0 = time.perf_counter()
    if isinstance(options.get("overrides"), list):
        options["overrides"] = parse_pairs(options["overrides"], "override")
    config = resolve(options, load_recipe(recipe) if isinstance(recipe, (str, os.PathLike)) else recipe)
    if work_dir is None and report_dir is not None:
        work_dir = report_dir  # reconstruction checkpoints live beside the report
    tgt = get_target(config)
    out_path = check_output_path(output) if output is not None else None
    report_path = _check_report_dir(report_dir) if report_dir is not None else None
    if report_path is not None:  # first, so that an interrupted run can be repeated (and resumed) from it
        label = type(model).__name__ if isinstance(model, nn.Module) else model
        header = f"qcompile {label}: the resolved recipe of this run (qcompile MODEL.py --recipe recipe.toml)"
        atomic_write(report_path / "recipe.toml", dump_recipe(config, header).encode())
    kwargs = dict(model_args or {})
    module: ModuleType | None = None
    if isinstance(model, nn.Module):
        if example_inputs is None or calib is None:
            raise ModelFileError("compiling an nn.Module needs example_inputs= and calib= (a list of batches)")
        net, source = model, type(model).__name__
    else:
        module = load_model_file(model)
        source = str(model)
        net = _call_with(module.build, source, kwargs)
        if example_inputs is None:
            example_inputs = _call_with(module.example_inputs, source, kwargs)
        if dynamic_dims is None and callable(getattr(module, "dynamic_dims", None)):
            dynamic_dims = _call_with(module.dynamic_dims, source, kwargs)
        if calib is None:
            if calib_path is not None:
                kwargs["calib"] = calib_path
            calib = _call_with(module.calibration_data, source, kwargs)
    if not isinstance(net, nn.Module):
        raise ModelFileError(f"{source}: build() returned {type(net).__name__}, not a torch.nn.Module")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    batches = _as_batches(calib)
    check_calibration(batches, example_inputs, dims=dynamic_dims)
    if verify_data is None and module is not None and callable(getattr(module, "verification_data", None)):
        verify_data = _call_with(module.verification_data, source,
                                 {"verify_num": config.target_options.verify_samples, **kwargs})
        where = f"{source}: verification_data()"
    else:
        where = "given by the caller (verify_data=)"
    batches, verify, where = verification_split(batches, verify_data, where, config.target_options.verify_samples)
    check_calibration(verify, example_inputs, "verification", dynamic_dims)
    torch.manual_seed(config.quant.seed)
    program = Program(model=net, example_inputs=example_inputs, calib=batches, dynamic_dims=dynamic_dims,
                      config=config, target=tgt,
                      source=source, verify=verify, verify_source=where,
                      work_dir=None if work_dir is None else str(work_dir))
    program.report["config"] = config.flat()
    program.report["source"] = source
    pipeline = Pipeline(passes if passes is not None else default_passes(config, tgt), stop_after=stop_after)
    pipeline.run(program)
    result = CompileResult(program, None, program.report)
    if stop_after is None and program.lowered is not None:
        data = program.lowered.onnx_bytes
        float_bytes = sum(p.numel() * 4 for p in net.parameters())
        program.report["sizes"] = {"onnx_bytes": len(data), "float_param_bytes": float_bytes,
                                   "ratio_to_float_params": round(len(data) / max(float_bytes, 1), 4)}
        program.report["checks"] = program.checks
        if out_path is not None:
            if "agreement" not in program.report["checks"] or "integer_kernels" not in program.report["checks"]:
                raise VerificationError(f"not writing {out_path}: no pass checked the lowered model in the target's "
                                        "runtime (the pipeline lacks the target's verification pass)")
            atomic_write(out_path, data)
            result.output = out_path
    if evaluate:
        if module is None or not callable(getattr(module, "evaluate", None)):
            raise ModelFileError(f"{source} has no evaluate(); --eval needs one")
        result.metrics = run_evaluation(module, program, kwargs)
        program.report["metrics"] = result.metrics
    program.report["total_seconds"] = round(time.perf_counter() - t0, 2)
    if report_path is not None:
        write_report(report_path, program.report)
    return result


def verification_split(calib: list[Batch], verify: Any, where: str, samples: int
                       ) -> tuple[list[Batch], list[Batch], str]:
    """``(calibration, verification, where they came from)``.

    Rule: verification inputs are never calibration inputs. Given ones (``verify``, not None) are
    used as they are; otherwise the last ``min(samples, N // 4)`` of the N calibration samples are
    held out of calibration and verify the compile.
    """
    if verify is not None:
        return calib, _as_batches(verify), where
    total = sum(batch_size(b) for b in calib)
    n = min(samples, total // 4)
    if n < 1:
        raise CalibrationDataError(f"{total} calibration sample(s) leave none to hold out for verifying the "
                                   "compile: give at least 4, or verification inputs (verification_data() in "
                                   "the model file, verify_data= in the API)")
    first, last = split_holdout(calib, n)
    return first, last, (f"held-out calibration samples: the last {n} of {total} "
                         f"(calibration used the other {total - n})")


def run_evaluation(module: ModuleType, program: Program, kwargs: dict[str, Any]) -> dict[str, dict]:
    """The model file's evaluate() on the float model, the fake-quant model (computed with the
    target's integer arithmetic once the target's check made it) and the ORT session."""
    from qcompiler.backends import ort as ort_backend

    ev_kwargs = {k: v for k, v in kwargs.items() if k != "calib"}
    metrics: dict[str, dict] = {}
    runs: dict[str, Callable] = {
        "float": lambda b: call(program.model, b),
        "fake_quant": lambda b: call(fake_quant_model(program), b),
    }
    if program.lowered is not None:
        runs["ort"] = ort_backend.runner(ort_backend.session(program.lowered.onnx_bytes))
    for name, run in runs.items():
        t = time.perf_counter()
        with torch.no_grad():
            metrics[name] = _call_with(module.evaluate, program.source, {"run": run, **ev_kwargs})
        log.info("evaluate %-10s %s (%.1fs)", name, metrics[name], time.perf_counter() - t)
    return metrics


def _check_report_dir(path: str | os.PathLike) -> Path:
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create report directory {p}: {exc.strerror}") from exc
    if not os.access(p, os.W_OK):
        raise OutputError(f"cannot write to report directory {p}")
    return p


def write_report(path: Path, report: dict[str, Any]) -> None:
    """report.json (everything) and summary.md (the short human version) in ``path``."""
    atomic_write(path / "report.json", json.dumps(report, indent=2, default=str).encode())
    atomic_write(path / "summary.md", summary_markdown(report).encode())
    recon = report.get("reconstruction", {})
    if recon.get("units"):
        plot_reconstruction(recon["units"], path / "reconstruction_loss.png", recon.get("oscillation"))


def plot_reconstruction(units: list[dict], path: Path, oscillation: float | None = None) -> None:
    """Per-unit reconstruction loss before and after (log scale) as a PNG, titled with the after
    curve's oscillation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, len(units) * 0.35), 4))
    xs = range(len(units))
    ax.plot(xs, [u["loss_before"] for u in units], "o-", label="before (round to nearest)")
    ax.plot(xs, [u["loss_after"] for u in units], "s-", label="after reconstruction")
    ax.set_yscale("log")
    ax.set_xlabel("unit")
    ax.set_ylabel("output reconstruction loss")
    ax.set_xticks(list(xs), [u["unit"].split(":", 1)[-1] for u in units], rotation=90, fontsize=7)
    ax.legend()
    if oscillation is not None:
        ax.set_title(f"oscillation (upward variation of ln loss) {oscillation:.3f}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def summary_markdown(report: dict[str, Any]) -> str:
    cfg = report.get("config", {})
    lines = [f"# qcompile {report.get('source', '')}", "",
             f"- target `{cfg.get('target')}`, method `{cfg.get('method')}`, "
             f"{cfg.get('bits')}, capture: {report.get('capture', {}).get('path')}",
             f"- total time {report.get('total_seconds')} s"]
    sizes = report.get("sizes")
    if sizes:
        lines.append(f"- ONNX size {sizes['onnx_bytes']:,} bytes ({sizes['ratio_to_float_params']:.2f}x the float "
                     "parameters)")
    checks = report.get("checks", {})
    if "integer_kernels" in checks:
        k = checks["integer_kernels"]
        lines.append(f"- integer kernels: {k['integer_kernels']}; float compute ops left: {k['float_kernels'] or 0}")
    if "agreement" in checks:
        lines.append(f"- ORT vs fake-quant: {checks['agreement']}")
    lines += ["", "| pass | seconds |", "|---|---|"]
    lines += [f"| {r['pass']} | {r['seconds']} |" for r in report.get("passes", [])]
    metrics = report.get("metrics")
    if metrics:
        lines += ["", "| model | metrics |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in metrics.items()]
    return "\n".join(lines) + "\n"
