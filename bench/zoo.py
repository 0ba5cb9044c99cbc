"""The model-zoo table: each small Hugging Face architecture of models/hf_zoo.py compiled and verified.

    python bench/zoo.py [KEY=VALUE ...] [--archs bert gpt2 ...] [--size small|default] [--out bench/results/zoo.md]

Per architecture: the capture path, whether the compile ended verified (or the one-line error),
the integer and float kernels ONNX Runtime runs, the layers kept float by plan, and the ORT vs
fake-quant agreement on the held-out inputs (top-1 for classifiers, worst relative error, cosine).
Default options: ``bits=w8a8``, rtn.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import qcompiler  # noqa: E402
from qcompiler.errors import QCompileError  # noqa: E402

from common import ROOT, compile_options, emit, quiet  # noqa: E402

MODEL = ROOT / "models" / "hf_zoo.py"


def row(arch: str, size: str, options: dict) -> dict:
    """One architecture's compile outcome."""
    t = time.perf_counter()
    try:
        res = qcompiler.compile(str(MODEL), model_args={"arch": arch, "size": size}, **options)
    except QCompileError as exc:
        return {"arch": arch, "result": f"FAIL: {str(exc).splitlines()[0][:160]}",
                "seconds": round(time.perf_counter() - t, 1)}
    k, a = res.checks["integer_kernels"], res.checks["agreement"]
    top1 = a.get("top1_agreement")
    return {"arch": arch, "result": "verified", "capture": res.report["capture"]["path"],
            "integer kernels": sum(k["integer_kernels"].values()), "float compute": sum(k["float_kernels"].values()),
            "kept float": len(k.get("kept_float", [])),
            "top-1 agreement": "n/a" if top1 is None else f"{100 * top1:.1f}%",
            "worst rel. error": f"{a['worst_error']:.2g}", "cosine": f"{a['cosine']:.5f}",
            "seconds": round(time.perf_counter() - t, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("options", nargs="*", metavar="KEY=VALUE", help="compile options (bits=w8a8 by default)")
    p.add_argument("--archs", nargs="+", help="architectures (default: all of models/hf_zoo.py)")
    p.add_argument("--size", default="small", choices=("small", "default"),
                   help="small configs, or the image architectures' default configs (full width, 96 pixels)")
    p.add_argument("--out", help="write the table to this Markdown file")
    args = p.parse_args()
    quiet()
    sys.path.insert(0, str(MODEL.parent))
    from hf_zoo import ARCHS

    options = {"bits": "w8a8", **compile_options(args.options)}
    rows = []
    for arch in args.archs or ARCHS:
        rows.append(row(arch, args.size, options))
        print(rows[-1], flush=True)
    cols = ["arch", "result", "capture", "integer kernels", "float compute", "kept float", "top-1 agreement",
            "worst rel. error", "cosine", "seconds"]
    lines = [f"Model zoo ({args.size} configs), {options}", "", "| " + " | ".join(cols) + " |",
             "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    emit("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
