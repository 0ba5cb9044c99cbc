"""Which kind of quantized tensor costs a model its accuracy: activation quantizers grouped by the op
that produces the tensor, each group switched on alone.

    python bench/act_groups.py --model models/minilm.py [--samples 32] [--out FILE.md] [KEY=VALUE ...]

After calibration (the compile's own, KEY=VALUE options as for ``qcompiler.compile``), the output of
the fake-quant graph on the first ``--samples`` verification inputs is compared with the float
model's (mean cosine per sample, outputs flattened): with every quantizer on, with the weight
quantizers alone, and with each group of activation quantizers alone (weights float). A group is
the registry kind of the quantized tensor's producer (``layer_norm``, ``gelu``, ``matmul``, ...;
the aten name where the registry has no kind).
"""

from __future__ import annotations

import argparse
import collections
import sys

import torch
import torch.nn.functional as F

from common import ROOT, compile_options, emit, quiet


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("options", nargs="*", metavar="KEY=VALUE", help="compile options")
    p.add_argument("--model", default=str(ROOT / "models" / "minilm.py"))
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--out")
    args = p.parse_args()
    quiet()
    import qcompiler
    from qcompiler.backends.ort import take_samples
    from qcompiler.ir import registry
    from qcompiler.ir.program import call

    r = qcompiler.compile(args.model, stop_after="calibrate", **compile_options(args.options))
    program, gm = r.program, r.program.gm
    chosen = take_samples(program.verify, args.samples)
    batch = tuple(torch.cat([b[i] for b in chosen])[:args.samples] for i in range(len(chosen[0])))
    with torch.no_grad():
        ref = call(program.model, batch).flatten(1)

    def cosine() -> float:
        with torch.no_grad():
            return float(F.cosine_similarity(call(gm, batch).flatten(1), ref).mean())

    acts = list(program.quantizer_nodes("act"))
    weights = list(program.quantizer_nodes("weight"))

    def mode(nodes: list, m: str) -> None:
        for n in nodes:
            gm.get_submodule(str(n.target)).mode = m

    rows = [("all quantizers", len(acts) + len(weights), cosine())]
    mode(acts, "off")
    rows.append(("weights only", len(weights), cosine()))
    mode(weights, "off")
    groups: dict[str, list] = collections.defaultdict(list)
    for n in acts:
        src = n.args[0]
        groups[registry.kind(src, gm) or str(src.target).split(".")[-2 if "." in str(src.target) else -1]].append(n)
    for name, nodes in groups.items():
        mode(nodes, "quant")
        rows.append((f"activations: {name} outputs only", len(nodes), cosine()))
        mode(nodes, "off")
    lines = ["| quantized | quantizers | cosine to float |", "|---|---|---|"]
    lines += [f"| {name} | {n} | {c:.5f} |" for name, n, c in rows]
    emit(f"{args.model}, {args.options or 'default options'}, first {args.samples} verification inputs\n\n"
         + "\n".join(lines), args.out)


if __name__ == "__main__":
    sys.exit(main())
