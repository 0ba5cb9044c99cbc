"""Reconstruction granularities side by side, and where MRECG's merges fall among random ones.

    python bench/granularity.py [KEY=VALUE ...] [--model FILE.py] [--bits w2a4] [--iters 2000]
                                [--granularities ...] [--random N] [--random-iters 200] [--out FILE.md]
                                [--plot FILE.png]

Part 1: each granularity (layer, block, mrecg-modcap, mrecg-loss) compiled with QDrop at the same
seed, bits and iterations; per run the units, ORT top-1 on the model's evaluation set (with its
validation and test halves where the model has them) and its top-1 agreement with the fake-quant
model, the oscillation of the loss curve at the block outputs (``passes/reconstruct``: total upward
variation of ln loss; the same points whatever the units), the reconstruction seconds and, for
mrecg-loss, the probe's seconds. ``--plot`` draws every run's loss at the block outputs.

Part 2 (``--random N``): N schemes that merge k random adjacent block pairs (pairwise, k as
mrecg-modcap's, so every scheme has the same number of units), at ``--random-iters`` iterations,
with block, mrecg-modcap and mrecg-loss at that schedule beside them: their ORT top-1 and where it
ranks among the random schemes (the fraction of them it beats or ties).
"""

from __future__ import annotations

import argparse
import itertools
import random
import sys
from pathlib import Path

from accuracy import evaluate_all
from common import ROOT, compile_options, emit, quiet

GRANULARITIES = ("layer", "block", "mrecg-modcap", "mrecg-loss")


def run(model: str, bits: str, merges: list[int] | None = None, **options) -> dict:
    """One compile (``accuracy.evaluate_all``: ORT top-1 on the model's evaluation set, ORT vs
    fake-quant agreement) and its reconstruction report; ``merges`` replaces the MRECG pass by one
    that merges those adjacent block pairs."""
    from qcompiler.config import resolve
    from qcompiler.passes import Mrecg
    from qcompiler.pipeline import default_passes, get_target

    if merges is not None:
        config = resolve({"bits": bits, **options})
        options["passes"] = [Mrecg(merges) if p.name == "mrecg" else p
                             for p in default_passes(config, get_target(config))]
    row = evaluate_all(model, bits, keep_result=True, references=False, **options)
    report = row.pop("result").report
    recon, part = report["reconstruction"], report.get("partition", {})
    return {"top1": row["ort"], "val": row["ort_val"], "test": row["ort_test"], "agreement": row["agreement"],
            "units": len(recon["units"]), "losses": recon["block_losses"], "oscillation": recon["oscillation"],
            "recon_s": recon["seconds"], "probe_s": part.get("probe", {}).get("seconds"),
            "compile_s": row["compile_s"], "merges": part.get("merges", []),
            "blocks": len(part.get("blocks", [])) or None, "k": part.get("k")}


def part1_table(rows: dict[str, dict], head: str) -> str:
    lines = [head, "", "| granularity | units | ORT top-1 | val / test halves | ORT vs fake-quant agreement | "
             "oscillation | reconstruction s | probe s | merges |", "|---|---|---|---|---|---|---|---|---|"]
    for g, r in rows.items():
        halves = f"{r['val']:.2f} / {r['test']:.2f}" if r["val"] is not None else "-"
        merges = "; ".join(" + ".join(x.split(":", 1)[1] for x in m) for m in r["merges"]) or "-"
        probe = f"{r['probe_s']:.1f}" if r["probe_s"] is not None else "-"
        lines.append(f"| {g} | {r['units']} | {r['top1']:.2f} | {halves} | {r['agreement']:.2f}% | "
                     f"{r['oscillation']:.3f} | {r['recon_s']:.1f} | {probe} | {merges} |")
    return "\n".join(lines) + "\n"


def part2_table(random_rows: list[dict], named: dict[str, dict], head: str) -> str:
    accs = sorted(r["top1"] for r in random_rows)
    q = [accs[round(f * (len(accs) - 1))] for f in (0.0, 0.25, 0.5, 0.75, 1.0)]
    lines = [head, "", f"{len(accs)} random schemes: ORT top-1 min {q[0]:.2f}, quartiles {q[1]:.2f} / {q[2]:.2f} / "
             f"{q[3]:.2f}, max {q[4]:.2f}", "", "| scheme | units | ORT top-1 | oscillation | beats or ties |",
             "|---|---|---|---|---|"]
    for g, r in named.items():
        share = sum(a <= r["top1"] for a in accs) / len(accs)
        lines.append(f"| {g} | {r['units']} | {r['top1']:.2f} | {r['oscillation']:.3f} | {100 * share:.0f}% |")
    return "\n".join(lines) + "\n"


def plot(rows: dict[str, dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for g, r in rows.items():
        ax.plot(range(len(r["losses"])), r["losses"], "o-", label=f"{g} (oscillation {r['oscillation']:.2f})")
    ax.set_yscale("log")
    ax.set_xlabel("block output")
    ax.set_ylabel("loss after reconstruction (quantized vs float)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(ROOT / "models/resnet_cifar.py"))
    p.add_argument("--bits", default="w2a4")
    p.add_argument("--iters", type=int, default=2000)
    p.add_argument("--granularities", nargs="+", default=list(GRANULARITIES), choices=GRANULARITIES)
    p.add_argument("--random", type=int, default=0, metavar="N")
    p.add_argument("--random-iters", type=int, default=200)
    p.add_argument("--seed", type=int, default=0, help="seed of the random schemes")
    p.add_argument("--out")
    p.add_argument("--plot")
    p.add_argument("options", nargs="*", help="further compile options KEY=VALUE (before --granularities)")
    args = p.parse_args(argv)
    quiet(progress=True)
    stem = Path(args.model).stem
    options = {"method": "qdrop", **compile_options(args.options)}
    rows: dict[str, dict] = {}
    for g in args.granularities:
        rows[g] = run(args.model, args.bits, granularity=g, iters=args.iters, **options)
        r = rows[g]
        print(f"{g}: ORT {r['top1']:.2f} (agreement {r['agreement']:.2f}%), oscillation {r['oscillation']:.3f}, "
              f"{r['compile_s']:.0f} s", flush=True)
    text = part1_table(rows, f"{stem} {args.bits}, QDrop, {args.iters} iterations per unit, "
                             f"options {options}")
    if args.plot:
        plot(rows, args.plot)
    if args.random:
        short = {"iters": args.random_iters, **options}
        named = {g: run(args.model, args.bits, granularity=g, **short) for g in ("block", "mrecg-modcap", "mrecg-loss")}
        blocks, k = named["mrecg-modcap"]["blocks"], named["mrecg-modcap"]["k"]
        rng = random.Random(args.seed)
        random_rows = []
        for i in range(args.random):
            merges = sorted(rng.sample(range(blocks - 1), k))
            while any(b - a < 2 for a, b in itertools.pairwise(merges)):  # pairwise: no block in two pairs
                merges = sorted(rng.sample(range(blocks - 1), k))
            random_rows.append(run(args.model, args.bits, merges=merges, granularity="block", **short))
            print(f"random {i + 1}/{args.random} {merges}: ORT {random_rows[-1]['top1']:.2f}", flush=True)
        text += "\n" + part2_table(random_rows, named, f"Random schemes of {k} merged pairs out of {blocks} blocks, "
                                                       f"{args.random_iters} iterations per unit")
    emit(text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
