"""all-MiniLM-L6-v2 in ONNX Runtime: float, qcompiler and ONNX Runtime's own quantizers, side by side.

    python bench/minilm.py [KEY=VALUE ...] [--rows w8a8 w4a8 ...] [--rounds 10] [--out bench/results/minilm.md]

Rows: the float model exported to ONNX; qcompiler at each ``--rows`` width (rtn, or
``BITS:METHOD`` such as ``w4a8:adaround``; ``,KEY=VALUE`` after it adds options to that row alone,
as in ``w8a8,split_outliers=0.03``, and ``model_arg.NAME=VALUE`` a model-file argument, as the
reconstruction rows' ``model_arg.padding=max_length``), with the KEY=VALUE compile options; ONNX Runtime's
``quantize_dynamic`` (its defaults: int8 weights per tensor, activations quantized per batch at
run time) and ``quantize_static`` (QDQ, per-channel int8 weights, uint8 activations, MinMax,
calibrated on the same 512 sentences). Per row, on the 1,000 held-out sentences of
models/minilm.py: mean cosine to the float embeddings and top-10 neighbour overlap; ORT latency at
batch 32 x sequence 128 (median of ``--rounds`` runs, all sessions interleaved, 2 threads) and its
ratio to float; file size and its ratio. A compile whose ORT check fails is reported as such.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, compile_options, emit, quiet  # noqa: E402

sys.path.insert(0, str(ROOT / "models"))


def _ort_peers(float_bytes: bytes) -> dict[str, bytes]:
    """ONNX Runtime's quantize_dynamic and quantize_static of the float model."""
    import minilm
    import numpy as np
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(minilm.calibration_data(padding="max_length"))

        def get_next(self):  # noqa: ANN202
            b = next(self.batches, None)
            return None if b is None else {"input_ids": b[0].numpy().astype(np.int64),
                                            "attention_mask": b[1].numpy().astype(np.int64)}

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        src, dyn, sta = (os.path.join(tmp, n) for n in ("f.onnx", "d.onnx", "s.onnx"))
        Path(src).write_bytes(float_bytes)
        quantize_dynamic(src, dyn, weight_type=QuantType.QInt8)
        out["ORT quantize_dynamic"] = Path(dyn).read_bytes()
        quantize_static(src, sta, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        out["ORT quantize_static"] = Path(sta).read_bytes()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("options", nargs="*", metavar="KEY=VALUE", help="qcompiler compile options for every row")
    p.add_argument("--rows", nargs="+", default=["w8a8", "w4a8"], help="qcompiler rows: BITS or BITS:METHOD")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--out")
    args = p.parse_args()
    quiet()
    import minilm
    import torch

    import qcompiler
    from qcompiler.backends import ort as ob
    from qcompiler.backends.onnx_qdq import export_onnx
    from qcompiler.errors import QCompileError

    model = minilm.build()
    float_bytes = export_onnx(model, minilm.example_inputs(), None, minilm.dynamic_dims())
    models: dict[str, bytes | str] = {"float (ONNX)": float_bytes}
    for row in args.rows:
        spec, *extra = row.split(",")
        bits, _, method = spec.partition(":")
        name = f"qcompiler {bits} {method or 'rtn'}" + "".join(f", {e}" for e in extra)
        t = time.perf_counter()
        opts = compile_options(args.options + extra)
        model_args = {k.split(".", 1)[1]: opts.pop(k) for k in list(opts) if k.startswith("model_arg.")}
        try:
            res = qcompiler.compile(str(ROOT / "models" / "minilm.py"), bits=bits, method=method or "rtn",
                                    model_args=model_args, **opts)
            models[name] = res.onnx_bytes
            print(f"{name}: compiled in {time.perf_counter() - t:.0f} s, ORT check {res.checks['agreement']}",
                  flush=True)
        except QCompileError as exc:
            models[name] = f"not verified: {str(exc).splitlines()[0][:200]}"
            print(f"{name}: {models[name]}", flush=True)
    models.update(_ort_peers(float_bytes))
    batch = minilm.encode(minilm.held_out()[:32])
    sessions = {k: ob.session(v) for k, v in models.items() if isinstance(v, bytes)}
    feeds = {k: ob.feeds(s, batch) for k, s in sessions.items()}
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for k, s in sessions.items():  # warm-up
        s.run(None, feeds[k])
    for _ in range(args.rounds):
        for k, s in sessions.items():
            t = time.perf_counter()
            s.run(None, feeds[k])
            times[k].append(time.perf_counter() - t)
    base = statistics.median(times["float (ONNX)"])
    lines = ["| model | cosine | top-10 overlap | latency b32 x s128 (ms) | vs float | size (MB) | vs float |",
             "|---|---|---|---|---|---|---|"]
    for k, v in models.items():
        if not isinstance(v, bytes):
            lines.append(f"| {k} | {v} | | | | | |")
            continue
        with torch.no_grad():
            m = minilm.evaluate(ob.runner(sessions[k]))
        med = statistics.median(times[k])
        lines.append(f"| {k} | {m['cosine']:.4f} | {m['top10_overlap']:.3f} | {med * 1e3:.0f} | {med / base:.2f}x "
                     f"| {len(v) / 1e6:.1f} | {len(v) / len(float_bytes):.2f}x |")
        print(lines[-1], flush=True)
    title = (f"all-MiniLM-L6-v2 on {len(minilm.held_out())} held-out sentences; qcompiler options "
             f"{args.options or 'default'}; {args.rounds} latency rounds")
    emit(title + "\n\n" + "\n".join(lines), args.out)


if __name__ == "__main__":
    main()
