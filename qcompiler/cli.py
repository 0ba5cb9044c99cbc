"""The ``qcompile`` command line.

    qcompile MODEL.py --target onnx-int8 [--bits w8a8] [--method rtn] [--calib FILE.npz]
             [--model-arg KEY=VALUE ...] [--eval] [--report DIR] -o OUT.onnx

Errors a user can cause print one line (``qcompile: error: ...``) and exit with status 2; nothing
is written then. A model file is Python code and runs when loaded.
"""

from __future__ import annotations

import argparse
import logging
import sys

from qcompiler.errors import QCompileError

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage dump
        print(f"qcompile: error: {message} (see qcompile --help)", file=sys.stderr)
        raise SystemExit(EXIT_ERROR)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="qcompile", description="Quantize a PyTorch model file to an integer ONNX model.")
    p.add_argument("model", help="model file defining build(), example_inputs(), calibration_data() [, evaluate()]")
    p.add_argument("-o", "--output", required=True, help="output .onnx path (written atomically)")
    p.add_argument("--target", default="onnx-int8", help="deployment target (default onnx-int8)")
    p.add_argument("--bits", default="w8a8", help="weight/activation bits, wNaM with N, M in 2..8 (default w8a8)")
    p.add_argument("--method", default="rtn",
                   help="rtn (round to nearest, default), adaround, brecq or qdrop (reconstruction)")
    p.add_argument("--calib", help="calibration .npz passed to the model file's calibration_data(calib=...)")
    p.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="keyword argument for build()/calibration_data()/evaluate() (repeatable)")
    p.add_argument("--override", action="append", default=[], metavar="PATTERN=wNaM",
                   help="per-layer bits for layers whose name matches the glob PATTERN (repeatable)")
    p.add_argument("--per-tensor", action="store_true", help="one weight scale per tensor, not per channel")
    sym = p.add_mutually_exclusive_group()
    sym.add_argument("--w-asymmetric", dest="w_symmetric", action="store_false", default=None,
                     help="asymmetric weights (a zero point per channel) wherever the target holds them "
                          "(the default), and log the layers where it cannot")
    sym.add_argument("--w-symmetric", dest="w_symmetric", action="store_true",
                     help="symmetric weights only (default: per-channel asymmetric where the target holds them)")
    p.add_argument("--w-init", default="mse", help="weight range: mse (default) or minmax")
    p.add_argument("--a-init", default="mse", help="activation range: mse (default), minmax or percentile")
    p.add_argument("--percentile", type=float, default=99.99, help="percentile for --a-init percentile")
    p.add_argument("--no-first-last-8bit", action="store_true",
                   help="quantize the first and last layers at --bits too (default: 8-bit)")
    p.add_argument("--full-range-weights", action="store_true",
                   help="8-bit weights use [-128, 127]; exact only on CPUs with VNNI (default: 7-bit range)")
    p.add_argument("--midrise-bits", type=int, default=2, metavar="N",
                   help="weight grids of at most N bits may sit half a step off zero: symmetric ones use the "
                        "zero-free midrise grid, asymmetric ones may take half-integer zero points "
                        "(default 2; 0: never)")
    p.add_argument("--a-bits-all", action="store_true",
                   help="also quantize tensors no conv/linear reads (add operands) at the activation width "
                        "(default: they are stored at the target's 8 bits, as they multiply nothing)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--iters", type=int, default=20000,
                   help="reconstruction iterations per unit (default 20000). On a 2-core CPU one iteration of a "
                        "ResNet-20 block costs about 15 ms: 2000 iterations take about 5 min for the whole model, "
                        "20000 about 50 min; the log gives an estimate for your model after a few iterations")
    p.add_argument("--batch-size", type=int, default=32, help="reconstruction mini-batch (default 32)")
    p.add_argument("--qdrop", type=float, help="QDrop probability (default 0.5 for qdrop, 1 for adaround/brecq)")
    p.add_argument("--granularity", help="reconstruction units: layer or block (default: the method's)")
    p.add_argument("--w-lr", type=float,
                   help="AdaRound learning rate (default 1e-2 up to 2000 iterations, then 1e-2 x 2000 / iters: "
                        "1e-3 at 20000; with fewer than 2000, raising it so that w_lr x iters is about 20 helps)")
    p.add_argument("--a-lr", type=float,
                   help="LSQ activation step learning rate (default 4e-5, scaled like --w-lr beyond 2000 iterations)")
    p.add_argument("--w-step-lr", type=float, default=0.0,
                   help="also learn the weight steps, Adam lr relative to each step (e.g. 1e-3; default 0: fixed)")
    p.add_argument("--bias-correct", action="store_true",
                   help="reconstruction: before and after training each unit, move each layer's bias by the "
                        "per-channel mean its quantized output is off from the float one on the calibration set")
    p.add_argument("--holdout", type=int, default=0, metavar="N",
                   help="reconstruction: keep the last N calibration samples out of training and report each "
                        "unit's loss on them before and after (how well the learned rounding generalizes)")
    p.add_argument("--cache-mb", type=int, default=4096,
                   help="memory for reconstruction caches; beyond it they spill to files in --report DIR "
                        "(default 4096)")
    p.add_argument("--verify-samples", type=int, default=256, metavar="N",
                   help="samples the ORT check runs on: the model file's verification_data(), else the last N "
                        "calibration samples (at most a quarter), held out of calibration (default 256)")
    p.add_argument("--min-agreement", type=float, default=0.99,
                   help="least ORT vs fake-quant top-1 agreement the check accepts, in (0, 1] (default 0.99)")
    p.add_argument("--max-error", type=float, default=0.01,
                   help="largest relative error ||ORT - fake-quant|| / ||fake-quant|| the check accepts on any one "
                        "sample, in [0, 1) (default 0.01; 0 demands equal outputs)")
    p.add_argument("--eval", action="store_true", help="evaluate the float, fake-quant and ORT models")
    p.add_argument("--report", metavar="DIR", help="write report.json and summary.md to DIR")
    p.add_argument("-q", "--quiet", action="store_true", help="only errors and the final line")
    return p


def _setup_logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(name)s: %(message)s",
                        stream=sys.stderr)
    from qcompiler.logs import quiet_exporters

    quiet_exporters()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.quiet)
    try:
        from qcompiler.api import compile as qcompile
        from qcompiler.config import parse_pairs

        result = qcompile(
            args.model, bits=args.bits, method=args.method, target=args.target, output=args.output,
            calib_path=args.calib, model_args=parse_pairs(args.model_arg, "model-arg"), evaluate=args.eval,
            report_dir=args.report, overrides=args.override, per_channel=not args.per_tensor,
            w_symmetric=args.w_symmetric, w_midrise=args.midrise_bits, a_bits_all=args.a_bits_all,
            w_init=args.w_init, a_init=args.a_init, percentile=args.percentile,
            first_last_8bit=not args.no_first_last_8bit, reduce_range=not args.full_range_weights, seed=args.seed,
            iters=args.iters, batch_size=args.batch_size, qdrop=args.qdrop, granularity=args.granularity,
            w_lr=args.w_lr, a_lr=args.a_lr, w_step_lr=args.w_step_lr, bias_correct=args.bias_correct,
            holdout=args.holdout, cache_mb=args.cache_mb, verify_samples=args.verify_samples,
            min_agreement=args.min_agreement, max_error=args.max_error)
    except QCompileError as exc:
        print(f"qcompile: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("qcompile: interrupted; no output written", file=sys.stderr)
        return EXIT_INTERRUPTED
    rep = result.report
    k = rep.get("checks", {}).get("integer_kernels", {})
    ag = rep.get("checks", {}).get("agreement", {})
    print(f"wrote {result.output} ({rep['sizes']['onnx_bytes']:,} bytes) in {rep['total_seconds']} s: "
          f"{sum(k.get('integer_kernels', {}).values())} integer kernels, {sum(k.get('float_kernels', {}).values())} "
          f"float; ORT vs fake-quant on {ag.get('samples')} held-out samples: top-1 agreement "
          f"{ag.get('top1_agreement', 'n/a')}, worst relative error {ag.get('worst_error', 0):.3g}")
    for name, m in result.metrics.items():
        print(f"  {name:<10} {m}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
