"""Weight and activation quantizer families side by side at equal iterations: ORT top-1 and compile time.

    python bench/methods.py [KEY=VALUE ...] [--model FILE.py] [--iters 2000] [--out FILE.md]
                            [--bits w4a4 w2 ...] [--methods rtn qdrop qdrop/nulsq ...] [--scales channel tensor]

A method is a registered ``--method`` name, or ``METHOD/ACT`` for that method with the activation
family ACT (``qdrop/nulsq``: QDrop with nuLSQ activation steps). Bits ``wN`` are weights only
(activations float). Each cell is one full compile at ``--iters`` iterations per unit, evaluated in
ONNX Runtime on the model's own evaluation set (test10k for ResNet-20, imagenet-val for
EfficientNet-Lite0); the target is onnx-int8 where the model has an integer form, else onnx-fp
(free Mr.BiQ weights, nuLSQ activations, weights-only bits), marked ``fp`` in the cell.
``--scales channel tensor`` runs per-channel and per-tensor weight scales. ``--out`` is rewritten
after every cell, so an interrupted run keeps the cells it finished.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from qcompiler.config import parse_bits
from qcompiler.methods import METHODS as ALL_METHODS
from qcompiler.quantizers import family

from accuracy import evaluate_all
from common import ROOT, compile_options, emit, quiet

METHODS = ("rtn", "adaround", "qdrop", "flexround", "flexround-qdrop", "mrbiq", "mrbiq-uniform", "qdrop/nulsq")
DEFAULT_BITS = {"resnet_cifar": ["w4a4", "w3a3", "w2a4", "w4", "w2"], "efficientnet_lite": ["w4a4", "w2"]}


def settings(method: str, bits: str) -> dict:
    """The compile options of one ``METHOD[/ACT]`` cell, with the target it deploys to."""
    name, _, act = method.partition("/")
    if name not in ALL_METHODS:
        raise SystemExit(f"unknown method {name!r}; registered: {', '.join(ALL_METHODS)}")
    options: dict = {"method": name}
    if act:
        options["act_quantizer"] = act
    w_family = ALL_METHODS[name].defaults.get("weight_quantizer", "uniform")
    integer = parse_bits(bits)[1] is not None and all(
        getattr(family(f), "integer_form", True) for f in (w_family, act or "uniform"))
    options["target"] = "onnx-int8" if integer else "onnx-fp"
    return options


def level_spread(result) -> str:  # noqa: ANN001 - CompileResult
    """For learned non-uniform activation levels (nuLSQ): how far their steps moved apart and where,
    as medians over quantizers of: largest / smallest step, step std / mean, the learned range over
    the calibrated one (sum of steps / (n x the calibrated uniform step)), and the step just above
    zero and the top step, each over the quantizer's mean step."""
    import statistics

    from qcompiler.quantizers.nulsq import NuLSQQuantizer

    qs = [m for m in result.program.gm.modules() if isinstance(m, NuLSQQuantizer)]
    if not qs:
        return ""

    def med(f) -> float:  # noqa: ANN001
        return statistics.median(float(f(q.steps.detach(), q)) for q in qs)

    return (f"; nuLSQ steps over {len(qs)} quantizers (medians): max/min {med(lambda d, q: d.max() / d.min()):.2f}, "
            f"std/mean {med(lambda d, q: d.std() / d.mean()):.3f}, "
            f"range/calibrated {med(lambda d, q: d.sum() / (d.numel() * q.scale.detach().flatten()[0])):.3f}, "
            f"first step above zero/mean {med(lambda d, q: d[min(q.zero_index(), d.numel() - 1)] / d.mean()):.3f}, "
            f"top step/mean {med(lambda d, q: d[-1] / d.mean()):.3f}")


def table(model: str, results: dict, bits: list[str], methods: list[str], scales: list[str], iters: int) -> str:
    head = "| bits | scales | float | " + " | ".join(methods) + " |"
    lines = [f"{model}, {iters} iterations per unit; ORT top-1 (compile seconds, ORT vs fake-quant top-1 "
             "agreement); fp: deployed with --target onnx-fp\n", head, "|---" * (len(methods) + 3) + "|"]
    first = next(iter(results.values()))
    for b in bits:
        for sc in scales:
            row = [b, sc, f"{first['float']:.2f}"]
            for m in methods:
                r = results.get((b, sc, m))
                mark = " fp" if r and r["target"] == "onnx-fp" else ""
                row.append(f"{r['ort']:.2f} ({r['compile_s']:.0f} s, {r['agreement']:.1f}%){mark}" if r else "-")
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(ROOT / "models/resnet_cifar.py"))
    p.add_argument("--bits", nargs="+")
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--scales", nargs="+", default=["channel"], choices=["channel", "tensor"])
    p.add_argument("--iters", type=int, default=2000)
    p.add_argument("--out")
    p.add_argument("options", nargs="*", help="further compile options KEY=VALUE (e.g. batch_size=32)")
    args = p.parse_args(argv)
    quiet(progress=True)
    stem = Path(args.model).stem
    bits = args.bits or DEFAULT_BITS.get(stem, ["w4a4"])
    options = compile_options(args.options)
    results: dict[tuple[str, str, str], dict] = {}
    for b in bits:
        for sc in args.scales:
            for m in args.methods:
                cell = settings(m, b)
                extra = {} if cell["method"] == "rtn" else {"iters": args.iters}
                r = evaluate_all(args.model, b, keep_result=True, per_channel=sc == "channel", **cell, **extra,
                                 **options)
                r["target"] = cell["target"]
                results[(b, sc, m)] = r
                spread = level_spread(r.pop("result"))
                print(f"{stem} {b} {sc} {m} ({cell['target']}): ORT {r['ort']:.2f} (fake-quant {r['fake_quant']:.2f}, "
                      f"agreement {r['agreement']:.2f}%, {r['compile_s']:.0f} s){spread}", flush=True)
                emit(table(stem, results, bits, args.methods, args.scales, args.iters), args.out, echo=False)
    emit(table(stem, results, bits, args.methods, args.scales, args.iters), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
