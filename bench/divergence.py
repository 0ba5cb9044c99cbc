"""Where the deployed ONNX model and the fake-quant model part ways, activation by activation.

    python bench/divergence.py [--model models/resnet_cifar.py] [--bits w4a4] [--images 64] [KEY=VALUE ...]

Compiles the model, then runs both the fake-quant graph and the ONNX model (in ONNX Runtime) on the
first ``--images`` evaluation images, the ONNX model with every activation's stored integers (the
input of its DequantizeLinear) exposed as an output. Both hold every quantized activation on the
same integer grid, so they compare exactly: for each activation quantizer in graph order it prints
the fraction of elements whose integer differs, the largest difference in steps, and the fraction
differing by more than one step, then the first activation with differences of more than one step.

Rounding ties flipped by float summation order show as rare one-step differences that grow layer
after layer (a one-step change of a 4-bit input can move an 8-bit output by many steps). A lowering
that computes something else shows as many differences, or large ones, where the inputs still agree
(EfficientNet-Lite0's int32 bias overflow showed as 3% of the stem's outputs off by 2-3 steps).
"""

from __future__ import annotations

import argparse
import collections
import sys

import numpy as np
import onnx
import torch

from common import ROOT, compile_options, quiet


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(ROOT / "models/resnet_cifar.py"))
    p.add_argument("--bits", default="w4a4")
    p.add_argument("--images", type=int, default=64)
    p.add_argument("options", nargs="*", help="compile options KEY=VALUE (e.g. method=qdrop iters=200)")
    args = p.parse_args(argv)
    quiet()
    import qcompiler
    from qcompiler.api import load_model_file
    from qcompiler.backends import ort as ob

    options = compile_options(args.options)
    # Stop before the target's own ORT check, which would refuse the very models worth looking at.
    r = qcompiler.compile(args.model, bits=args.bits, stop_after="lower_onnx_qdq", **options)
    gm = r.program.gm
    batch = []

    first: list[torch.Tensor] = []

    def take(b):  # keep the first images; the rest of the evaluation need not run
        if sum(x[0].shape[0] for x in batch) >= args.images:
            return torch.zeros(b[0].shape[0], *first[0].shape[1:])
        batch.append(b)
        first.append(gm(*b))
        return first[-1]

    with torch.no_grad():
        load_model_file(args.model).evaluate(take)
    inputs = tuple(torch.cat([b[k] for b in batch])[:args.images] for k in range(len(batch[0])))

    # The fake-quant side: every activation quantizer's output, by module name.
    fq: dict[str, torch.Tensor] = {}
    hooks = []
    for n in gm.graph.nodes:
        if n.meta.get("qc.quantizer") == "act":
            mod = gm.get_submodule(str(n.target))
            hooks.append(mod.register_forward_hook(lambda m, a, out, key=str(n.target): fq.__setitem__(key, out)))
    with torch.no_grad():
        gm(*inputs)
    for h in hooks:
        h.remove()

    # The ORT side: the activations' DequantizeLinear outputs (those not reading a constant). They come
    # in the same graph order as the quantizers; equal scales may share one initializer, so names
    # cannot be matched, but the order and the shapes can.
    model = onnx.load_from_string(r.onnx_bytes)
    consts = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            consts[node.output[0]] = onnx.numpy_helper.to_array(node.attribute[0].t)
    dqs = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] not in consts]
    if len(dqs) != len(fq):
        raise SystemExit(f"{len(fq)} activation quantizers but {len(dqs)} activation DequantizeLinear nodes")
    names = list(fq)
    # Expose the stored integers (the DequantizeLinear's input), not the dequantized floats: ORT fuses
    # DQ -> Conv -> Q into an integer kernel only while the DQ output is not a graph output.
    model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n.input[0]) for n in dqs)
    sess = ob.session(model.SerializeToString())
    feed = {i.name: x.numpy() for i, x in zip(sess.get_inputs(), inputs, strict=True)}
    outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feed), strict=True))
    found = {k: (n.input[0], n.input[1], n.input[2]) for k, n in zip(names, dqs, strict=True)}

    print(f"{len(names)} activation quantizers, {args.images} images\n")
    first_bad = None
    print("| activation | elements | differ | max steps | differ > 1 step |\n|---|---|---|---|---|")
    for k in names:
        scale, zp = float(consts[found[k][1]]), float(consts[found[k][2]])
        a = fq[k].detach().numpy()
        b = (outs[found[k][0]].astype(np.float32) - zp) * scale
        if a.shape != b.shape:
            raise SystemExit(f"{k}: fake-quant shape {a.shape} but ONNX {b.shape}: the orders differ")
        steps = np.abs(np.rint((a - b) / scale))
        print(f"| {k} | {a.size} | {np.mean(steps > 0):.2e} | {int(steps.max())} | {np.mean(steps > 1):.2e} |")
        if first_bad is None and np.any(steps > 1):
            ia, ib = np.rint(a / scale + zp).astype(int), outs[found[k][0]].astype(int)
            pairs = collections.Counter(zip(ia[steps > 1].tolist(), ib[steps > 1].tolist(), strict=True))
            where = [tuple(int(v) for v in i) for i in np.argwhere(steps > 1)[:6]]
            first_bad = (k, pairs.most_common(8), int(ia.min()), int(ia.max()), int(ib.min()), int(ib.max()), where)
    if first_bad is not None:
        k, common, a_lo, a_hi, b_lo, b_hi, where = first_bad
        print(f"\nfirst activation differing by more than one step: {k}; integers fake-quant [{a_lo}, {a_hi}], "
              f"ONNX [{b_lo}, {b_hi}]; most frequent (fake-quant, ONNX) pairs there: {common}; at {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
