"""Where reconstruction spends its time, per unit, against the cost of its convolutions.

    python bench/profile_recon.py [KEY=VALUE ...] [--model models/resnet_cifar.py] [--iters 200] [--bits w4a4]
                                  [--batch-size 32] [--cprofile 15]

For each unit it prints the measured time per training iteration (QDrop, batch ``--batch-size``; the unit's two
loss evaluations included) next to the *floor*: one float forward and backward of the same unit at
the same batch, quantizers off, gradients to the weights only (what any reconstruction must at least
pay). Floors are medians of 20 repetitions measured after the run, in the same process.
``--batch-size 1`` leaves the part of a step that does not depend on the data (operator dispatch,
autograd, optimizer). The seconds of every pass before reconstruction (calibration) are printed last.
``--cprofile N`` also prints the N functions with the most own time. ``KEY=VALUE`` are further compile
options (``act_quantizer=nulsq target=onnx-fp``); ``QCOMPILER_NATIVE=0`` in the environment times the
torch composition instead of the C kernels.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time

from common import ROOT, compile_options, machine, quiet


def floor_ms(gm, unit, batch: int, reps: int = 20) -> float:
    """Median ms of a float forward+backward of ``unit`` (weights require grad, inputs random)."""
    import torch

    from qcompiler.passes.reconstruct.units import modes, unit_module

    sub = unit_module(gm, unit, [])
    shapes = {n.name: n.meta["tensor_meta"].shape for n in gm.graph.nodes if "tensor_meta" in n.meta}
    xs = [torch.randn(batch, *shapes[x][1:]) for x in unit.inputs]
    xs = [x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x for x in xs]  # as reconstruct
    params = [p for n, p in gm.named_parameters() if not n.startswith("qc_")]
    for prm in params:
        prm.requires_grad_(True)
    times = []
    with modes(gm, sub, "off"):
        for _ in range(reps + 3):
            t = time.perf_counter()
            sub(*xs)[0].pow(2).sum().backward()
            times.append(time.perf_counter() - t)
    for prm in params:
        prm.requires_grad_(False)
        prm.grad = None
    times = sorted(times[3:])
    return 1e3 * times[len(times) // 2]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(ROOT / "models/resnet_cifar.py"))
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--bits", default="w4a4")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--cprofile", type=int, default=0, metavar="N")
    p.add_argument("options", nargs="*", help="KEY=VALUE compile options")
    args = p.parse_args(argv)
    quiet()
    from torch.fx.passes.shape_prop import ShapeProp

    import qcompiler

    prof = cProfile.Profile() if args.cprofile else None
    if prof:
        prof.enable()
    options = {"method": "qdrop", **compile_options(args.options)}
    r = qcompiler.compile(args.model, bits=args.bits, iters=args.iters, batch_size=args.batch_size,
                          stop_after="reconstruct", **options)
    if prof:
        prof.disable()
    gm, units = r.program.gm, r.program.units
    ShapeProp(gm).propagate(*r.program.calib[0])
    recs = r.report["reconstruction"]["units"]
    print("| unit | ms per iteration | float fwd+bwd floor ms | ratio |\n|---|---|---|---|")
    tot, tot_floor = 0.0, 0.0
    for unit, rec in zip(units, recs, strict=True):
        ms = 1e3 * rec["seconds"] / args.iters
        fl = floor_ms(gm, unit, r.program.config.recon.batch_size)
        tot, tot_floor = tot + ms, tot_floor + fl
        print(f"| {unit.name} | {ms:.1f} | {fl:.1f} | {ms / fl:.2f} |")
    print(f"| all | {tot:.1f} | {tot_floor:.1f} | {tot / tot_floor:.2f} |")
    passes = r.report["passes"]
    print("\n" + ", ".join(f"{x['pass']} {x['seconds']:.2f} s" for x in passes if x["pass"] != "reconstruct"))
    print(f"Machine: {machine()}")
    if prof:
        pstats.Stats(prof).sort_stats("tottime").print_stats(args.cprofile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
