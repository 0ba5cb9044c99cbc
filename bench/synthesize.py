"""Synthetic calibration images for EfficientNet-Lite0 from its BatchNorm statistics and class labels.

    python bench/synthesize.py --out synth.npz [--residue 1 --modulo 4] [--steps 120] [--limit N]

Each image starts as Gaussian noise (in the model's input space, std 0.5) and is optimised with
Adam (cosine decay) so that, batch by batch, every BatchNorm layer's input has the layer's running
mean and standard deviation (the sum over layers of the two L2 distances; BN inversion as in ZeroQ)
and the float model classifies it as its target class (cross-entropy, weight ``--ce-weight``). The
targets are the classes ``c`` with ``c % modulo == residue``, one image each: with the defaults,
250 of the 750 classes of eval750 and none of calib250's. Pixels are clamped to the input range
after each step and stored as uint8 in the model file's layout, so the result is an ordinary
calibration file (``model.calib=synth.npz``). The file is rewritten after every batch of 32 and a
rerun continues after the batches it holds.

About 2.9 s per optimisation step of a batch of 32 here (2 threads): 250 images at 120 steps take
36 minutes. What it gave: ``bench/results/recon_efficientnet_lite0_w4a4.md``, last section.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from common import ROOT


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help=".npz to write (images uint8 N x 224 x 224 x 3, labels)")
    p.add_argument("--modulo", type=int, default=4)
    p.add_argument("--residue", type=int, default=1)
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--lr", type=float, default=0.25)
    p.add_argument("--ce-weight", type=float, default=5.0)
    p.add_argument("--limit", type=int, help="stop after this many images")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not 0 <= args.residue < args.modulo:
        p.error("--residue must lie in [0, --modulo)")
    from qcompiler.api import load_model_file

    torch.manual_seed(args.seed)
    mod = load_model_file(str(ROOT / "models" / "efficientnet_lite.py"))
    net = mod.build().eval()
    for prm in net.parameters():
        prm.requires_grad_(False)
    distances: list[torch.Tensor] = []

    def bn_distance(m: torch.nn.BatchNorm2d, inputs: tuple, _out: torch.Tensor) -> None:
        x = inputs[0]
        mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
        distances.append(torch.norm(mean - m.running_mean)
                         + torch.norm(var.add(m.eps).sqrt() - (m.running_var + m.eps).sqrt()))

    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.register_forward_hook(bn_distance)
    classes = [c for c in range(mod.NUM_CLASSES) if c % args.modulo == args.residue][:args.limit]
    out = Path(args.out)
    images, labels = [], []
    if out.is_file():  # continue an interrupted run
        with np.load(out, allow_pickle=False) as done:
            images, labels = [done["images"]], [done["labels"]]
        if not np.array_equal(labels[0], classes[:len(labels[0])]):
            p.error(f"{out} holds other classes; remove it or choose another --out")
    start = len(labels[0]) if labels else 0
    t0 = time.perf_counter()
    for b in range(0, len(classes), 32):
        target = torch.tensor(classes[b:b + 32])
        x = (torch.randn(len(target), 3, mod.IMAGE_SIZE, mod.IMAGE_SIZE) * 0.5).requires_grad_(True)
        if b < start:  # drawn anyway so that a resumed run gets the same noise as an uninterrupted one
            continue
        opt = torch.optim.Adam([x], lr=args.lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.steps)
        for _ in range(args.steps):
            distances.clear()
            logits = net(x)
            bn = sum(distances)
            ce = torch.nn.functional.cross_entropy(logits, target)
            opt.zero_grad()
            (bn + args.ce_weight * ce).backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                x.clamp_(-127 / 128, 128 / 128)  # the range of (pixel - 127) / 128
        img = (x.detach() * 128 + 127).round().clamp(0, 255).permute(0, 2, 3, 1).to(torch.uint8).numpy()
        with torch.no_grad():
            hit = (net(mod.preprocess(img)).argmax(1) == target).float().mean().item()
        images.append(img)
        labels.append(target.numpy())
        np.savez(out, images=np.concatenate(images), labels=np.concatenate(labels))
        print(f"images {b + len(target)}/{len(classes)}: BN distance {bn.item():.1f}, cross-entropy {ce.item():.3f}, "
              f"float top-1 on the stored images {hit * 100:.0f}%, {time.perf_counter() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
