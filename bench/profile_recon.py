"""Where reconstruction spends its time: cProfile of a short QDrop run on ResNet-20.

    python bench/profile_recon.py [--iters 100] [--bits w4a4] [--top 15]

Prints the per-iteration wall time of the training loops and the functions with the most own time.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys

from common import ROOT, quiet


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--bits", default="w4a4")
    p.add_argument("--top", type=int, default=15)
    args = p.parse_args(argv)
    quiet()
    import qcompiler

    prof = cProfile.Profile()
    prof.enable()
    r = qcompiler.compile(str(ROOT / "models/resnet_cifar.py"), bits=args.bits, method="qdrop", iters=args.iters,
                          stop_after="reconstruct")
    prof.disable()
    units = r.report["reconstruction"]["units"]
    train_s = sum(u["seconds"] for u in units)
    print(f"{len(units)} units x {args.iters} iterations: {train_s:.1f} s, "
          f"{1e3 * train_s / (len(units) * args.iters):.1f} ms per iteration (loss evaluations included)")
    pstats.Stats(prof).sort_stats("tottime").print_stats(args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
