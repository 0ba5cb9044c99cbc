"""What every bench script shares: quiet logs and how a result table is written."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def quiet() -> None:
    """Only errors from qcompiler and the exporter stack: the bench prints its own table."""
    from qcompiler.logs import quiet_exporters

    quiet_exporters()
    logging.getLogger("qcompiler").setLevel(logging.ERROR)


def emit(table: str, out: str | None) -> None:
    """Print the Markdown table, and write it to ``out`` when given."""
    print(table)
    sys.stdout.flush()
    if out:
        Path(out).write_text(table)
