"""Where ORT spends its time: per-op-type kernel time, float ONNX vs quantized ONNX.

    python bench/profile_ort.py [MODEL.py] [KEY=VALUE ...] [--batch 64] [--runs 20]

The input: the first batch of the model file's ``verification_data()`` when it has one (MiniLM:
32 sentences of 128 tokens), else ``--batch`` random rows shaped like its example input. Prints,
for both models, the mean kernel time per run of each op type and, compute op by compute op
(convs, matmuls, gemms) in graph order, the median time of the float kernel against the one that
replaces it.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import tempfile

import onnxruntime as ort
import torch

from common import ROOT, compile_options, quiet


def profile(model: bytes, feed: dict, runs: int, threads: int = 2) -> list[tuple[str, str, float]]:
    """(node name, op type, microseconds) of every kernel over ``runs`` runs."""
    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.enable_profiling = True
        so.profile_file_prefix = os.path.join(tmp, "prof")
        so.log_severity_level = 3
        sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
        for _ in range(runs):
            sess.run(None, feed)
        with open(sess.end_profiling()) as f:
            events = json.load(f)
    return [(e["name"], e["args"]["op_name"], e["dur"]) for e in events
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", default=str(ROOT / "models/resnet_cifar.py"))
    p.add_argument("options", nargs="*", metavar="KEY=VALUE", help="qcompiler compile options (bits=w8a8 ...)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--runs", type=int, default=20)
    args = p.parse_args(argv)
    quiet()
    import qcompiler
    from qcompiler.api import load_model_file
    from qcompiler.backends import ort as ob
    from qcompiler.backends.onnx_qdq import export_onnx

    r = qcompiler.compile(args.model, **compile_options(args.options))
    module = load_model_file(args.model)
    if hasattr(module, "verification_data"):
        batch = module.verification_data()[0]
    else:
        example = r.program.example_inputs[0]
        batch = (torch.randn(args.batch, *example.shape[1:]),)
    models = {"fp32": export_onnx(r.program.model, r.program.example_inputs, None, r.program.dynamic_dims),
              "quant": r.onnx_bytes}
    per_conv: dict[str, list[float]] = {}
    for name, data in models.items():
        events = profile(data, ob.feeds(ob.session(data), batch), args.runs)
        totals = collections.Counter()
        for _, op, us in events:
            totals[op] += us
        print(f"\n{name}: {sum(totals.values()) / args.runs / 1e3:.2f} ms of kernels per run")
        for op, us in totals.most_common():
            print(f"  {op:24s} {us / args.runs / 1e3:8.2f} ms")
        times: dict[str, list[float]] = collections.defaultdict(list)
        for node, op, us in events:
            if any(k in op for k in ("Conv", "MatMul", "Gemm")):
                times[node].append(us)
        per_conv[name] = [statistics.median(v) / 1e3 for v in times.values()]
    print("\nop    fp32 ms  quant ms  ratio")
    for i, (a, b) in enumerate(zip(per_conv["fp32"], per_conv["quant"], strict=False)):
        print(f"{i:4d} {a:8.2f} {b:9.2f} {b / a:6.2f}")
    print(f"all  {sum(per_conv['fp32']):8.2f} {sum(per_conv['quant']):9.2f} "
          f"{sum(per_conv['quant']) / sum(per_conv['fp32']):6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
