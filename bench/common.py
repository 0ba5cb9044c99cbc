"""What every bench script shares: quiet logs, the machine a result came from, and how a table is written."""

from __future__ import annotations

import logging
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def compile_options(pairs: list[str]) -> dict:
    """``KEY=VALUE`` command-line options as compile keyword arguments: ints, floats and true/false
    become values of those types, anything else stays a string."""
    return {k: _value(v) for k, v in (o.split("=", 1) for o in pairs)}


def _value(v: str):
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(v.lower(), v)


def quiet(progress: bool = False) -> None:
    """Only errors from qcompiler and the exporter stack: the bench prints its own table. With
    ``progress``, reconstruction's line per finished unit (its losses, its seconds and the time
    left) goes to stderr too, with the time of day, so a run of hours shows where it is."""
    from qcompiler.logs import quiet_exporters

    quiet_exporters()
    logging.getLogger("qcompiler").setLevel(logging.ERROR)
    units = logging.getLogger("qcompiler.reconstruct")
    units.setLevel(logging.INFO if progress else logging.NOTSET)
    units.propagate = not progress  # its lines print once, through its own handler
    if progress and not any(getattr(h, "qc_progress", False) for h in units.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        handler.qc_progress = True
        units.addHandler(handler)


def machine() -> str:
    """The CPU and thread count a timing or result comes from.

    Sessions here do not always get the same processor (an AVX2 EPYC for some, an AVX-512 VNNI one
    for others), and the same compile has taken 245 s on one machine and 409 s on another. Other
    kernels also sum in another order, so even accuracies move. Compare figures only when they carry
    the same line.
    """
    import torch

    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                info.setdefault(key.strip(), value.strip())
                if not line.strip():
                    break
    except OSError:
        pass
    flags = set(info.get("flags", "").split())
    if "avx512f" in flags:
        isa = "AVX-512 VNNI" if "avx512_vnni" in flags else "AVX-512"
    else:
        isa = "AVX2" if "avx2" in flags else platform.machine()
    name = info.get("model name", platform.processor() or platform.machine())
    model = f" (family {info['cpu family']} model {info['model']})" if "cpu family" in info else ""
    return f"{name}{model}, {isa}, torch {torch.__version__}, {torch.get_num_threads()} threads"


def emit(table: str, out: str | None, echo: bool = True) -> None:
    """Print the Markdown table and the machine it was measured on (unless ``echo`` is false); write
    both to ``out`` when given."""
    table = f"{table}\nMachine: {machine()}\n"
    if echo:
        print(table)
        sys.stdout.flush()
    if out:
        Path(out).write_text(table)
