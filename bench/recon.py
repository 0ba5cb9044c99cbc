"""Reconstruction methods side by side: ORT top-1 of rtn, adaround, brecq, qdrop (or any --methods) at equal iterations.

    python bench/recon.py [KEY=VALUE ...] [--model FILE.py] [--iters 2000] [--out FILE.md]
                          [--bits w4a4 ...] [--methods rtn qdrop ...]

Defaults: ResNet-20 at W4A4, W3A3, W2A4 and the weight-only settings W4, W2 (activations at 8 bits,
so that the model still runs integer kernels), every method at ``--iters`` iterations per unit,
accuracy of the exported ONNX model in ONNX Runtime on the model's own evaluation set (test10k
for ResNet-20, eval750 for EfficientNet-Lite0). ``--model models/efficientnet_lite.py`` defaults
to W4A8 and W4A4. Each cell is one full compile; the table also gives the compile seconds.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from qcompiler.methods import METHODS as ALL_METHODS

from accuracy import evaluate_all
from common import ROOT, compile_options, emit, quiet

METHODS = ("rtn", "adaround", "brecq", "qdrop")  # the default columns; --methods takes any registered one
DEFAULT_BITS = {"resnet_cifar": ["w4a4", "w3a3", "w2a4", "w4a8", "w2a8"], "efficientnet_lite": ["w4a8", "w4a4"]}


def table(model: str, results: dict[tuple[str, str], dict], bits: list[str], methods: list[str], iters: int) -> str:
    head = "| bits | float | " + " | ".join(f"{m} ORT top-1 (s)" for m in methods) + " |"
    lines = [f"{model}, {iters} iterations per unit\n", head, "|---" * (len(methods) + 2) + "|"]
    for b in bits:
        row = [b, f"{next(iter(results.values()))['float']:.2f}"]
        for m in methods:
            r = results.get((b, m))
            row.append(f"{r['ort']:.2f} ({r['compile_s']:.0f})" if r else "-")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(ROOT / "models/resnet_cifar.py"))
    p.add_argument("--bits", nargs="+")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(ALL_METHODS))
    p.add_argument("--iters", type=int, default=2000)
    p.add_argument("--out")
    p.add_argument("options", nargs="*", help="further compile options KEY=VALUE (e.g. batch_size=32)")
    args = p.parse_args(argv)
    quiet()
    stem = Path(args.model).stem
    bits = args.bits or DEFAULT_BITS.get(stem, ["w4a4"])
    options = compile_options(args.options)
    results: dict[tuple[str, str], dict] = {}
    for b in bits:
        for m in args.methods:
            extra = {} if m == "rtn" else {"iters": args.iters}
            r = evaluate_all(args.model, b, method=m, **extra, **options)
            results[(b, m)] = r
            print(f"{stem} {b} {m}: ORT {r['ort']:.2f} (fake-quant {r['fake_quant']:.2f}, agreement "
                  f"{r['agreement']:.2f}%, {r['compile_s']:.0f} s)", flush=True)
    emit(table(stem, results, bits, args.methods, args.iters), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
