"""How much better a compiled model does on its calibration images than on unseen ones.

    python bench/generalization.py --model models/efficientnet_lite.py --onnx eff.onnx [more.onnx ...] [--by-class K]

For the float model and each ONNX file, top-1 on the model file's evaluation set and on the
calibration images (``--calib``, default the model file's data directory's ``calib250.npz``),
through the model file's ``evaluate(run, data=...)``. A quantized model that keeps float accuracy on
the calibration images but not on the evaluation set has fitted its rounding and step sizes to
those images. ``--by-class K`` adds the evaluation top-1 over the images whose label is ``r``
modulo ``K``, for each ``r`` that occurs (calib250 holds the classes 0 mod 4, eval750 the others: with
K = 4 the groups are classes a calibration set may or may not cover).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from common import ROOT, emit, quiet


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(ROOT / "models/efficientnet_lite.py"))
    p.add_argument("--onnx", nargs="+", required=True)
    p.add_argument("--calib", help="labelled .npz of the calibration images (default: calib250.npz beside the "
                                   "evaluation data)")
    p.add_argument("--by-class", type=int, metavar="K", help="also top-1 per group of classes (label modulo K)")
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
    with tempfile.TemporaryDirectory(prefix="qc_groups_") as tmp:
        groups = _class_groups(mod, args.by_class, Path(tmp)) if args.by_class else {}
        lines = ["| model | evaluation top-1 | calibration top-1 | gap |"
                 + "".join(f" evaluation, classes {r} mod {args.by_class} |" for r in groups),
                 "|---|---|---|---|" + "---|" * len(groups)]
        with torch.no_grad():
            for name, run in runs:
                ca = mod.evaluate(run, data=calib)["top1"]
                if groups:  # the groups partition the evaluation set: its top-1 without a second pass
                    parts = [mod.evaluate(run, data=g) for g in groups.values()]
                    ev = sum(round(r["top1"] * r["n"] / 100) for r in parts) * 100 / sum(r["n"] for r in parts)
                else:
                    parts, ev = [], mod.evaluate(run)["top1"]
                by = "".join(f" {r['top1']:.2f} |" for r in parts)
                lines.append(f"| {name} | {ev:.2f} | {ca:.2f} | {ca - ev:.2f} |{by}")
                print(lines[-1], flush=True)
    emit("\n".join(lines) + "\n", args.out)
    return 0


def _class_groups(mod, k: int, tmp: Path) -> dict[int, str]:
    """The evaluation set split by label modulo ``k``: residue -> path of an .npz with those images."""
    if k < 2:
        raise SystemExit("--by-class needs K >= 2")
    with np.load(mod._data_dir() / f"{mod.EVAL_DATASET}.npz", allow_pickle=False) as d:
        images, labels = d["images"], d["labels"]
    out = {}
    for r in sorted(set((labels % k).tolist())):
        keep = labels % k == r
        out[r] = str(tmp / f"classes_{r}_mod_{k}.npz")
        np.savez(out[r], images=images[keep], labels=labels[keep])
    return out


if __name__ == "__main__":
    sys.exit(main())
