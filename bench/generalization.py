"""How much better a compiled model does on its calibration images than on unseen ones.

    python bench/generalization.py --model models/efficientnet_lite.py --onnx eff.onnx [more.onnx ...]

For the float model and each ONNX file, top-1 on the model file's evaluation set and on the
calibration images (``--calib``, default the model file's data directory's ``calib250.npz``),
through the model file's ``evaluate(run, data=...)``. A quantized model that keeps float accuracy on
the calibration images but not on the evaluation set has fitted its rounding and step sizes to
those images.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from common import ROOT, emit, quiet


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(ROOT / "models/efficientnet_lite.py"))
    p.add_argument("--onnx", nargs="+", required=True)
    p.add_argument("--calib", help="labelled .npz of the calibration images (default: calib250.npz beside the "
                                   "evaluation data)")
    p.add_argument("--out")
    args = p.parse_args(argv)
    quiet()
    from qcompiler.api import load_model_file
    from qcompiler.backends import ort as ob

    mod = load_model_file(args.model)
    calib = args.calib or str(mod._data_dir() / "imagenet-sample" / "calib250.npz")
    net = mod.build().eval()
    runs = [("float", lambda b: net(*b))]
    runs += [(Path(f).name, ob.runner(ob.session(Path(f).read_bytes()))) for f in args.onnx]
    lines = ["| model | evaluation top-1 | calibration top-1 | gap |", "|---|---|---|---|"]
    with torch.no_grad():
        for name, run in runs:
            ev, ca = mod.evaluate(run)["top1"], mod.evaluate(run, data=calib)["top1"]
            lines.append(f"| {name} | {ev:.2f} | {ca:.2f} | {ca - ev:.2f} |")
            print(lines[-1], flush=True)
    emit("\n".join(lines) + "\n", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
