"""Compare compile settings on validation data: ORT top-1 on the model file's validation split.

    python bench/tune.py [--model FILE.py] [--metric top1] [--seeds N] [--out FILE.md] "KEY=VALUE,..." ...
                         [--bits w8a8 ...]

Each argument is one setting (compile options separated by commas; ``-`` for the defaults;
``weight_p=`` and ``wide_weight_p=`` (weight grids of 7 bits or more) set the weight range
searches' exponents; ``act_p=`` is the ``a_mse_p`` option; ``model_arg.NAME=`` passes a model-file
argument). Every cell is one compile evaluated
in ONNX Runtime on ``evaluate(split="val")`` (CIFAR-10 calib5k images 1,024 on; imagenet-val's even
rows; MiniLM's standard-library docstring sentences), never on the set the README reports:
defaults are chosen here. ``--metric`` names the figure of ``evaluate``'s result to print
(MiniLM: ``cosine``). ``--seeds N`` compiles every cell with seeds 0..N-1 (the ``seed``
option) and prints their mean, each value and their spread (max - min): settings closer than
one seed's spread are told apart by means, not by single compiles.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from common import ROOT, compile_options, emit, quiet


def measure(model_file: str, bits: str, metric: str = "top1", **options) -> float:
    """ORT ``metric`` on the validation split of one compile with ``options``."""
    import qcompiler
    from qcompiler.api import load_model_file
    from qcompiler.backends import ort as ob
    from qcompiler.quantizers import ranges

    names = {"weight_p": "WEIGHT_MSE_P", "wide_weight_p": "WIDE_WEIGHT_MSE_P"}
    if "act_p" in options:  # the name of the activation exponent before it was the a_mse_p option
        options["a_mse_p"] = options.pop("act_p")
    saved = {k: getattr(ranges, v) for k, v in names.items()}
    for k, v in names.items():
        setattr(ranges, v, options.pop(k, saved[k]))
    model_args = {k.split(".", 1)[1]: options.pop(k) for k in list(options) if k.startswith("model_arg.")}
    try:
        r = qcompiler.compile(model_file, bits=bits, model_args=model_args, **options)
    finally:
        for k, v in names.items():
            setattr(ranges, v, saved[k])
    with torch.no_grad():
        return load_model_file(model_file).evaluate(ob.runner(ob.session(r.onnx_bytes)), split="val")[metric]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(ROOT / "models/resnet_cifar.py"))
    p.add_argument("--bits", nargs="+", default=["w8a8"], help="widths; put the settings before --bits")
    p.add_argument("--metric", default="top1", help="the figure of evaluate()'s result to compare")
    p.add_argument("--seeds", type=int, default=1, help="compile each cell with seeds 0..N-1 and report their mean")
    p.add_argument("--out")
    p.add_argument("settings", nargs="+", help="KEY=VALUE,KEY=VALUE (or - for the defaults)")
    args = p.parse_args(argv)
    quiet(progress=True)
    if args.seeds < 1:
        p.error("--seeds must be at least 1")
    many = args.seeds > 1
    label = f"validation, mean of {args.seeds} seeds" if many else "validation"
    head = f"| model | bits | setting | ORT {args.metric} ({label}) |" + (
        f" seeds 0-{args.seeds - 1} | spread |" if many else "")
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for bits in args.bits:
        for setting in args.settings:
            opts = compile_options([o for o in setting.split(",") if o and o != "-"])
            if many and "seed" in opts:
                p.error(f"setting {setting!r} names a seed; --seeds chooses them")
            values = [measure(args.model, bits, args.metric, **opts, **({"seed": s} if many else {}))
                      for s in range(args.seeds)]
            cell = f"{sum(values) / len(values):.5g}"
            if many:
                cell += f" | {', '.join(f'{v:.5g}' for v in values)} | {max(values) - min(values):.3g}"
            lines.append(f"| {Path(args.model).stem} | {bits} | {setting} | {cell} |")
            print(lines[-1], flush=True)
    emit("\n".join(lines) + "\n", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
