"""The ``qcompile`` command line.

    qcompile MODEL.py [--recipe R.toml] [--bits w8a8] [--method rtn] [KNOB FLAGS ...]
             [--calib FILE.npz] [--model-arg KEY=VALUE ...] [--eval] [--report DIR] -o OUT.onnx

Every configuration flag is a knob of ``qcompiler.config`` (its recipe key with dashes); a flag
given beside ``--recipe`` overrides the recipe. Errors a user can cause print one line
(``qcompile: error: ...``) and exit with status 2; nothing is written then. A model file is Python
code and runs when loaded.
"""

from __future__ import annotations

import argparse
import logging
import sys

from qcompiler.config import default_of, knob_type, knobs
from qcompiler.errors import QCompileError

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130
#: Flags that say what to compile and where results go; every other flag is a recipe key.
RUN_FLAGS = ("model", "output", "recipe", "calib", "model_arg", "eval", "report", "quiet")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage dump
        print(f"qcompile: error: {message} (see qcompile --help)", file=sys.stderr)
        raise SystemExit(EXIT_ERROR)


def _add_knob(group, name: str, f) -> None:  # noqa: ANN001 - an argparse group, a dataclass Field
    """One knob's flag (and its aliases); the default is None so given flags can be told apart."""
    tp, _ = knob_type(f)
    flag = "--" + name.replace("_", "-")
    spellings = [flag] + [a for a, v in f.metadata["aliases"] if v is None]
    default = default_of(f)
    shown = "automatic" if default is None else default
    kw = {"dest": name, "default": None, "help": f"{f.metadata['help']} (default {shown})"}
    if tp is bool:
        group.add_argument(*spellings, action=argparse.BooleanOptionalAction, **kw)
    elif tp in (dict, list):
        group.add_argument(*spellings, action="append", metavar=f.metadata["metavar"], **kw)
    else:
        group.add_argument(*spellings, type=tp, metavar=f.metadata["metavar"], **kw)
    for alias, value in f.metadata["aliases"]:
        if value is not None:
            group.add_argument(alias, dest=name, action="store_const", const=value, default=None,
                               help=f"same as --{'no-' if value is False else ''}{flag[2:]}")


def build_parser() -> argparse.ArgumentParser:
    from qcompiler.methods import METHODS

    p = _Parser(prog="qcompile", description="Quantize a PyTorch model file to an integer ONNX model.",
                allow_abbrev=False, epilog="methods: " + "; ".join(f"{m.name}: {m.help}" for m in METHODS.values()))
    p.add_argument("model", help="model file defining build(), example_inputs(), calibration_data() [, evaluate()]")
    p.add_argument("-o", "--output", required=True, help="output .onnx path (written atomically)")
    p.add_argument("--recipe", metavar="FILE.toml", help="knob values from a recipe file; flags given here win")
    p.add_argument("--calib", help="calibration .npz passed to the model file's calibration_data(calib=...)")
    p.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="keyword argument for build()/calibration_data()/evaluate() (repeatable)")
    p.add_argument("--eval", action="store_true", help="evaluate the float, fake-quant and ORT models")
    p.add_argument("--report", metavar="DIR",
                   help="write report.json, summary.md and the resolved recipe.toml to DIR; reconstruction "
                        "checkpoints there let an interrupted run resume")
    p.add_argument("-q", "--quiet", action="store_true", help="only errors and the final line")
    groups = {None: p.add_argument_group("method and target"),
              "quant": p.add_argument_group("quantization"),
              "recon": p.add_argument_group("reconstruction"),
              "target_options": p.add_argument_group("target options")}
    for name, (stage, f) in knobs().items():
        _add_knob(groups[stage], name, f)
    return p


def given_knobs(args: argparse.Namespace) -> dict:
    """The knob values given on the command line (flags left out are None)."""
    from qcompiler.config import parse_pairs

    out = {k: getattr(args, k) for k in knobs() if getattr(args, k) is not None}
    if "overrides" in out:
        out["overrides"] = parse_pairs(out["overrides"], "override")
    return out


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

        result = qcompile(args.model, output=args.output, recipe=args.recipe, calib_path=args.calib,
                          model_args=parse_pairs(args.model_arg, "model-arg"), evaluate=args.eval,
                          report_dir=args.report, **given_knobs(args))
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
