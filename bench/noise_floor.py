"""How far ORT sits from the fake-quant model against how far float noise moves that model itself.

    python bench/noise_floor.py [--model FILE.py] [--bits w3a3] [--runs 10] [--out FILE.md] KEY=VALUE ...

One compile (options as ``KEY=VALUE``, e.g. ``method=mrbiq target=onnx-fp iters=2000``) with the
ORT check opened wide so the model comes back whatever it gives; then, on the check's own samples,
the agreement metrics of: ORT against the fake-quant model; each perturbed run of
``ort.noise_floor`` alone (seeds 0..runs-1, float results off by a float32 rounding); torch with its
reference convolution kernels (oneDNN off) against torch; ORT against that reference-kernel run; and
the floor the check uses (``ort.noise_floor`` with its defaults).
"""

from __future__ import annotations

import argparse
import sys

import torch

from common import ROOT, compile_options, emit, quiet

KEYS = ("mean_error", "worst_error", "worst_sample", "top1_agreement")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(ROOT / "models/resnet_cifar.py"))
    p.add_argument("--bits", default="w3a3")
    p.add_argument("--runs", type=int, default=10, help="perturbed runs to show one by one")
    p.add_argument("--out")
    p.add_argument("options", nargs="*", help="compile options KEY=VALUE")
    args = p.parse_args(argv)
    quiet()
    import qcompiler
    from qcompiler.backends import ort as ob

    r = qcompiler.compile(args.model, bits=args.bits, max_error=0.99, min_agreement=0.01,
                          **compile_options(args.options))
    gm, batches = r.program.gm, ob.take_samples(r.program.verify, r.report["config"]["verify_samples"])
    ref = ob.outputs(lambda b: ob.call(gm, b), batches)
    sess = ob.session(r.onnx_bytes)
    got = ob.outputs(lambda b: [torch.from_numpy(o) for o in sess.run(None, ob.feeds(sess, b))], batches)
    with torch.backends.mkldnn.flags(enabled=False):
        alt = ob.outputs(lambda b: ob.call(gm, b), batches)
    rows = [("ORT vs fake-quant", ob.agreement(ref, got))]
    rows += [(f"perturbed run, seed {s}", ob.noise_floor_run(gm, batches, ref, s)) for s in range(args.runs)]
    rows += [("torch reference kernels vs torch", ob.agreement(ref, alt)), ("ORT vs torch reference kernels",
             ob.agreement(alt, got)), ("the check's floor (noise_floor)", ob.noise_floor(gm, batches, ref))]
    lines = [f"{args.model} {args.bits} {' '.join(args.options)}: {len(ref[0])} verification samples",
             "", "| comparison | " + " | ".join(KEYS) + " |", "|---" * (len(KEYS) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(f"{a[k]:.4g}" if k in a else "-" for k in KEYS) + " |" for name, a in rows]
    emit("\n".join(lines + [""]), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
