"""FP32 ONNX vs quantized ONNX in ONNX Runtime: size and latency, side by side in one process.

    python bench/latency.py models/resnet_cifar.py [--bits w8a8] [--threads 2] [--rounds 15] [--out FILE.md]

Both models are exported by qcompiler from the same float model (float: plain export; quantized:
the compile's QDQ model). Runs are interleaved (one float run, one quantized run, repeated) so
machine noise hits both alike; medians and their ratio are reported for batch 1 and batch 64.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from common import ROOT, emit, quiet


def measure(model_file: str, bits: str, threads: int, rounds: int, batches: tuple[int, ...]) -> dict:
    import qcompiler
    from qcompiler.backends import ort as ob
    from qcompiler.backends.onnx_qdq import export_onnx

    result = qcompiler.compile(model_file, bits=bits)
    float_bytes = export_onnx(result.program.model, result.program.example_inputs)
    quant_bytes = result.onnx_bytes
    sessions = {"fp32": ob.session(float_bytes, threads=threads), "quant": ob.session(quant_bytes, threads=threads)}
    example = result.program.example_inputs[0]
    out = {"model": model_file, "bits": bits, "threads": threads, "rounds": rounds,
           "size_fp32": len(float_bytes), "size_quant": len(quant_bytes)}
    for bs in batches:
        x = (torch.randn(bs, *example.shape[1:]),)
        feeds = {k: ob.feeds(s, x) for k, s in sessions.items()}
        for k, s in sessions.items():  # warm-up
            for _ in range(3):
                s.run(None, feeds[k])
        times: dict[str, list[float]] = {k: [] for k in sessions}
        reps = max(1, 64 // bs)  # several runs per sample at batch 1
        for _ in range(rounds):
            for k, s in sessions.items():
                t = time.perf_counter()
                for _ in range(reps):
                    s.run(None, feeds[k])
                times[k].append((time.perf_counter() - t) / reps)
        med = {k: statistics.median(v) for k, v in times.items()}
        out[f"batch{bs}"] = {"fp32_ms": med["fp32"] * 1e3, "quant_ms": med["quant"] * 1e3,
                             "ratio": med["quant"] / med["fp32"]}
    return out


def markdown(rows: list[dict]) -> str:
    lines = ["| model | bits | size fp32 | size quant | ratio | " +
             " | ".join(f"b{b} fp32 ms | b{b} quant ms | b{b} ratio" for b in (1, 64)) + " |",
             "|---|---|---|---|---|" + "---|" * 6]
    for r in rows:
        cells = [Path(r["model"]).stem, r["bits"], f"{r['size_fp32']:,}", f"{r['size_quant']:,}",
                 f"{r['size_quant'] / r['size_fp32']:.3f}"]
        for b in (1, 64):
            m = r[f"batch{b}"]
            cells += [f"{m['fp32_ms']:.2f}", f"{m['quant_ms']:.2f}", f"{m['ratio']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="*", default=[str(ROOT / "models/resnet_cifar.py")])
    p.add_argument("--bits", default="w8a8")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--out", help="also write the Markdown table here")
    args = p.parse_args(argv)
    quiet()
    rows = [measure(m, args.bits, args.threads, args.rounds, (1, 64)) for m in args.models]
    emit(markdown(rows), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
