"""Does reconstruction fit the classes of its calibration images? ResNet-20 on CIFAR-10, split by class.

    python bench/class_coverage.py [KEY=VALUE ...] [--bits w2a4 w4a4] [--out FILE.md]

EfficientNet-Lite0's calibration images (calib250) and evaluation images (eval750) share no class.
This measures, where there are images enough to do so, what that costs: ResNet-20 is compiled
twice per width, once calibrated on 1,024 images of all ten classes (the first 1,024 of
``calib5k.npz``, the standard set) and once on 1,024 images of classes 0-4 only, and the ONNX
Runtime model's top-1 is reported on the test images of classes 0-4 ("seen" by the second
calibration set) and 5-9 ("unseen"), beside the float model's. Options (``KEY=VALUE``) go to
every compile; the default is qdrop at 200 iterations per unit with AdaRound lr 0.1.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from common import ROOT, compile_options, emit, quiet

MODEL = ROOT / "models" / "resnet_cifar.py"
DEFAULTS = {"method": "qdrop", "iters": 200, "w_lr": 0.1}


def split_top1(run, images: np.ndarray, labels: np.ndarray, prep, seen: int) -> tuple[float, float]:
    """Top-1 (percent) of ``run`` on the test images of classes < ``seen`` and on the others."""
    preds = []
    with torch.no_grad():
        for i in range(0, len(images), 500):
            preds.append(run((prep(images[i:i + 500]),)).argmax(1).numpy())
    ok = np.concatenate(preds) == labels
    low = labels < seen
    return float(ok[low].mean()) * 100, float(ok[~low].mean()) * 100


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("options", nargs="*", help="KEY=VALUE compile options")
    p.add_argument("--bits", nargs="+", default=["w2a4", "w4a4"])
    p.add_argument("--num", type=int, default=1024, help="calibration images per set")
    p.add_argument("--out")
    args = p.parse_args(argv)
    quiet()
    import qcompiler
    from qcompiler.api import load_model_file
    from qcompiler.backends import ort as ob

    options = {**DEFAULTS, **compile_options(args.options)}
    mod = load_model_file(str(MODEL))
    data = mod._shared_data_dir() / "cifar10"
    pool, pool_labels = mod._load_images(data / "calib5k.npz", need_labels=True)
    test, test_labels = mod._load_images(data / "test10k.npz", need_labels=True)
    seen = 5
    sets = {"all 10 classes": pool[:args.num],
            f"classes 0-{seen - 1} only": pool[pool_labels < seen][:args.num]}
    net = mod.build().eval()
    f_seen, f_unseen = split_top1(lambda b: net(*b), test, test_labels, mod._preprocess, seen)
    lines = [f"ResNet-20, test10k split by class; options {' '.join(f'{k}={v}' for k, v in options.items())}; "
             f"{args.num} calibration images per set.", "",
             f"| bits | calibrated on | top-1 classes 0-{seen - 1} | top-1 classes {seen}-9 | "
             f"drop from float, 0-{seen - 1} | drop from float, {seen}-9 |", "|---|---|---|---|---|---|",
             f"| float | - | {f_seen:.2f} | {f_unseen:.2f} | - | - |"]
    for bits in args.bits:
        for name, images in sets.items():
            calib = [(mod._preprocess(images[i:i + 64]),) for i in range(0, len(images), 64)]
            r = qcompiler.compile(str(MODEL), bits=bits, calib=calib, **options)
            s, u = split_top1(ob.runner(ob.session(r.onnx_bytes)), test, test_labels, mod._preprocess, seen)
            lines.append(f"| {bits} | {name} | {s:.2f} | {u:.2f} | {f_seen - s:.2f} | {f_unseen - u:.2f} |")
            print(lines[-1], file=sys.stderr, flush=True)
    emit("\n".join(lines) + "\n", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
