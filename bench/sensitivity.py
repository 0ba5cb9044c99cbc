"""Which quantizers hurt a model most at round-to-nearest, one at a time, and how much of it a bias
correction removes.

    python bench/sensitivity.py [--model FILE.py] [--bits w4a4] [--images 128] [--limit N] [KEY=VALUE ...]

After calibration, each quantizer is switched on alone (everything else float) and the model's
prediction on the first ``--images`` calibration images is compared with the float model's: mean
KL divergence of the float prediction to the quantized one, and top-1 agreement. For a weight
quantizer the layer's bias is then corrected by the per-channel mean of the error the quantized
weights cause on that same data (what ``bias_correct=true`` does inside reconstruction), and the
KL is measured again. Rows are sorted by KL.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
from torch import fx

from common import ROOT, compile_options, emit, quiet


class _Capture(fx.Interpreter):
    """Runs a GraphModule and keeps the value of one node."""

    def __init__(self, gm: fx.GraphModule, name: str) -> None:
        super().__init__(gm)
        self.name, self.value = name, None

    def run_node(self, n: fx.Node):
        v = super().run_node(n)
        if n.name == self.name:
            self.value = v
        return v


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(ROOT / "models/efficientnet_lite.py"))
    p.add_argument("--bits", default="w4a4")
    p.add_argument("--images", type=int, default=128)
    p.add_argument("--limit", type=int, help="only the first N quantizers in graph order")
    p.add_argument("--out")
    p.add_argument("options", nargs="*", help="compile options KEY=VALUE")
    args = p.parse_args(argv)
    quiet()
    import qcompiler
    from qcompiler.ir import registry

    options = compile_options(args.options)
    r = qcompiler.compile(args.model, bits=args.bits, stop_after="calibrate", **options)
    gm = r.program.gm
    x = torch.cat([b[0] for b in r.program.calib])[: args.images]
    with torch.no_grad():
        ref = F.log_softmax(r.program.model(x).float(), 1)
    nodes = [n for n in gm.graph.nodes if n.meta.get("qc.quantizer") in ("act", "weight")][: args.limit]
    for n in gm.graph.nodes:
        if n.meta.get("qc.quantizer") in ("act", "weight"):
            gm.get_submodule(str(n.target)).mode = "off"

    def compare() -> tuple[float, float]:
        with torch.no_grad():
            out = F.log_softmax(gm(x).float(), 1)
        kl = F.kl_div(out, ref, log_target=True, reduction="batchmean")
        return float(kl), float((out.argmax(1) == ref.argmax(1)).float().mean()) * 100

    def layer_output(name: str) -> torch.Tensor:
        c = _Capture(gm, name)
        with torch.no_grad():
            c.run(x)
        return c.value

    rows = []
    for n in nodes:
        q = gm.get_submodule(str(n.target))
        layer = next(iter(n.users))
        q.mode = "quant"
        kl, agree = compare()
        corrected = "-"
        bias = registry.args_of(layer, gm).get("bias") if n.meta["qc.quantizer"] == "weight" else None
        if isinstance(bias, fx.Node) and bias.meta.get("qc.quantizer") == "bias":
            bias = bias.args[0]  # its quantizer passes it through: the activations are off
        if isinstance(bias, fx.Node) and bias.op == "get_attr":
            b = registry.get_tensor(gm, str(bias.target))
            saved = b.detach().clone()
            diff = layer_output(layer.name)
            q.mode = "off"
            diff = diff - layer_output(layer.name)
            q.mode = "quant"
            axis = 1 if registry.kind(layer, gm) == "conv" else diff.dim() - 1
            with torch.no_grad():
                b -= diff.mean(dim=[d for d in range(diff.dim()) if d != axis])
            corrected = f"{compare()[0]:.4f}"
            with torch.no_grad():
                b.copy_(saved)
        q.mode = "off"
        rows.append((kl, f"| {n.target} | {n.meta['qc.quantizer']} | {q.spec.describe()} | {kl:.4f} | {agree:.1f}% | "
                         f"{corrected} |"))
        print(rows[-1][1], flush=True)
    lines = [f"{args.bits}, {args.images} calibration images, one quantizer on at a time:", "",
             "| quantizer | kind | grid | KL to float | top-1 agreement | KL, bias corrected |",
             "|---|---|---|---|---|---|"] + [row for _, row in sorted(rows, key=lambda t: -t[0])]
    emit("\n".join(lines) + "\n", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
