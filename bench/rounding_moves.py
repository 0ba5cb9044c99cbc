"""How far a learned rounding moves the deployed weight integers from round-to-nearest's.

    python bench/rounding_moves.py [--model FILE.py] [--bits w4a4] [--out FILE.md] KEY=VALUE ...

One compile (options as ``KEY=VALUE``, e.g. ``method=mrbiq-uniform iters=2000 per_channel=false``);
then, for every weight quantizer placed on a calibrated grid (``grid_scale``: adaround, flexround,
mrbiq-uniform), the integers it stores against the integers round-to-nearest stores on that
calibrated grid (same zero point): the share of weights that moved, how far (1, 2-3, 4 or more
stored levels), the round-to-nearest levels the moves of 4 or more start from, and the learned step
over the calibrated one.
"""

from __future__ import annotations

import argparse
import collections
import sys

import torch

from common import ROOT, compile_options, emit, quiet


def moves(program) -> list[tuple[str, int, collections.Counter, collections.Counter, float]]:  # noqa: ANN001
    """Per weight quantizer on a calibrated grid: (name, weights, |moves| counted, start levels of
    moves >= 4 counted, mean learned step / calibrated step)."""
    from qcompiler.ir import registry
    from qcompiler.quantizers.uniform import UniformQuantizer

    gm, rows = program.gm, []
    for n in program.quantizer_nodes("weight"):
        q = gm.get_submodule(str(n.target))
        if not hasattr(q, "grid_scale"):
            continue
        w = registry.get_tensor(gm, str(n.args[0].target)).detach().float()
        rtn = UniformQuantizer(q.spec, q.scale.numel() if q.spec.axis is not None else None)
        rtn.scale.data, rtn.zero_point.data = q.grid_scale.clone(), q.zero_point.clone()
        before, after = rtn.int_repr(w), q.int_repr(w)
        d = (after - before).abs().int()
        bottom = rtn.level_store(torch.full_like(w, rtn.qmin), w)  # the stored integer of the grid's lowest level
        far = collections.Counter((before - bottom)[d >= 4].int().tolist())
        rows.append((str(n.target), w.numel(), collections.Counter(d.flatten().tolist()), far,
                     float((q.scale / q.grid_scale).mean())))
    return rows


def table(rows: list) -> str:
    """The per-quantizer rows and their total as Markdown."""
    def cells(count: int, c: collections.Counter) -> str:
        moved = count - c[0]
        band = (c[1], sum(v for k, v in c.items() if 2 <= k <= 3), sum(v for k, v in c.items() if k >= 4))
        return f"{count} | {100 * moved / count:.2f} | " + " | ".join(str(b) for b in band)

    lines = ["| weight | weights | moved % | by 1 | by 2-3 | by >=4 | RTN levels of the >=4 moves | step ratio |",
             "|---|---|---|---|---|---|---|---|"]
    total, far_all = collections.Counter(), collections.Counter()
    for name, count, c, far, ratio in rows:
        lines.append(f"| {name} | {cells(count, c)} | {dict(sorted(far.items())) or '-'} | {ratio:.3f} |")
        total.update(c)
        far_all.update(far)
    n = sum(r[1] for r in rows)
    lines.append(f"| all | {cells(n, total)} | {dict(sorted(far_all.items())) or '-'} | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(ROOT / "models/resnet_cifar.py"))
    p.add_argument("--bits", default="w4a4")
    p.add_argument("--out")
    p.add_argument("options", nargs="*", help="compile options KEY=VALUE")
    args = p.parse_args(argv)
    quiet()
    import qcompiler

    r = qcompiler.compile(args.model, bits=args.bits, **compile_options(args.options))
    rows = moves(r.program)
    if not rows:
        raise SystemExit("no weight quantizer on a calibrated grid (use a learned rounding method)")
    emit(f"{args.model} {args.bits} {' '.join(args.options)}\n\n{table(rows)}\n", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
