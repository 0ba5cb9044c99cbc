"""Accuracy of float, fake-quant and ORT models, and ORT vs fake-quant top-1 agreement.

    python bench/accuracy.py [--model FILE.py] [KEY=VALUE ...] [model.KEY=VALUE ...] [--bits w8a8 w4a4] [--out FILE.md]
                             [--progress]

Each row is one compile with the model file's own evaluate() (EfficientNet-Lite0: imagenet-val, with
the top-1 of its validation and test halves). The fake-quant model is computed with ORT's integer
arithmetic (``CompileResult.fake_quant``); the last agreement column is that of the same graph with
float requantization (``program.gm``), what the fake-quant model computed before: the gap is the
rounding ties float arithmetic flips.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from common import ROOT, compile_options, emit, quiet


def evaluate_all(model_file: str, bits: str, keep_result: bool = False, references: bool = True, **options) -> dict:
    """One compile, evaluated as float, fake-quant (ORT's integer arithmetic), fake-quant with float
    requantization, and in ORT; agreements are ORT's top-1 against each fake-quant version. With
    ``keep_result`` the row also holds the ``CompileResult`` (key ``result``); without
    ``references`` the float model and the float-requantizing graph are not evaluated (their keys
    are None)."""
    import qcompiler
    from qcompiler.api import load_model_file
    from qcompiler.backends import ort as ob

    t0 = time.perf_counter()
    r = qcompiler.compile(model_file, bits=bits, **options)
    compile_s = time.perf_counter() - t0
    ev = load_model_file(model_file).evaluate
    outs: dict[str, list[torch.Tensor]] = {"fake_quant": [], "float_requant": [], "ort": []}

    def rec(run, key):
        def wrapped(b):
            o = run(b)
            outs[key].append(o.detach().float())
            return o
        return wrapped

    sess = ob.session(r.onnx_bytes)
    with torch.no_grad():
        m_float = ev(lambda b: r.program.model(*b)) if references else {"top1": None}
        m_fq = ev(rec(lambda b: r.fake_quant(*b), "fake_quant"))
        if references:
            ev(rec(lambda b: r.program.gm(*b), "float_requant"))
        m_ort = ev(rec(ob.runner(sess), "ort"))
    ort_top1 = torch.cat(outs["ort"]).argmax(1)

    def agreement(key: str) -> float:
        return float((torch.cat(outs[key]).argmax(1) == ort_top1).float().mean()) * 100

    return {"model": Path(model_file).stem, "bits": bits, "options": options, "float": m_float["top1"],
            "fake_quant": m_fq["top1"], "ort": m_ort["top1"], "n": m_ort["n"], "dataset": m_ort.get("dataset"),
            "ort_val": m_ort.get("top1_val"), "ort_test": m_ort.get("top1_test"),
            "agreement": agreement("fake_quant"),
            "float_requant_agreement": agreement("float_requant") if references else None,
            "compile_s": compile_s, "int_kernels": sum(r.checks["integer_kernels"]["integer_kernels"].values()),
            **({"result": r} if keep_result else {})}


def markdown(rows: list[dict]) -> str:
    lines = ["| model | bits | options | float top-1 | fake-quant top-1 | ORT top-1 | ORT val / test halves | "
             "ORT vs fake-quant agreement | with float requantization | n | integer kernels | compile s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        opts = " ".join(f"{k}={v}" for k, v in r["options"].items()) or "-"
        halves = f"{r['ort_val']:.2f} / {r['ort_test']:.2f}" if r.get("ort_val") is not None else "-"
        lines.append(f"| {r['model']} | {r['bits']} | {opts} | {r['float']:.2f} | {r['fake_quant']:.2f} | "
                     f"{r['ort']:.2f} | {halves} | {r['agreement']:.2f}% | {r['float_requant_agreement']:.2f}% | "
                     f"{r['n']} | {r['int_kernels']} | {r['compile_s']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", action="append", default=None)
    p.add_argument("--bits", nargs="+", default=["w8a8", "w4a4"], help="put KEY=VALUE options before --bits")
    p.add_argument("--out")
    p.add_argument("--progress", action="store_true", help="a line per reconstructed unit on stderr (long runs)")
    p.add_argument("options", nargs="*", help="compile options KEY=VALUE (e.g. a_init=minmax); model.KEY=VALUE "
                   "goes to the model file's functions (e.g. model.views=2)")
    args = p.parse_args(argv)
    quiet(progress=args.progress)
    options = compile_options(args.options)
    model_args = {k[len("model."):]: v for k, v in options.items() if k.startswith("model.")}
    options = {k: v for k, v in options.items() if not k.startswith("model.")}
    if model_args:
        options["model_args"] = model_args
    rows = []
    for m in args.model or [str(ROOT / "models/resnet_cifar.py")]:
        for bits in args.bits:
            rows.append(evaluate_all(m, bits, **options))
            print(markdown(rows[-1:]).splitlines()[-1], flush=True)
    emit(markdown(rows), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
