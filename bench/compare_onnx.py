"""Are two ONNX models' initializers byte-identical? (Same results before and after a refactor.)

    python bench/compare_onnx.py A.onnx B.onnx [--out FILE.md]

Compares every initializer by name: dtype, shape and bytes. Exit status 0 when all are identical,
1 otherwise; the table lists the initializers that differ (or are missing on one side).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import onnx
from onnx import numpy_helper

from common import emit


def initializers(path: str) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in onnx.load(path).graph.initializer}


def compare(a: str, b: str) -> tuple[int, list[str]]:
    """(initializers compared, rows of a Markdown table for those that differ)."""
    x, y = initializers(a), initializers(b)
    rows = []
    for name in sorted(set(x) | set(y)):
        if name not in x or name not in y:
            rows.append(f"| {name} | only in {'B' if name not in x else 'A'} | | |")
            continue
        p, q = x[name], y[name]
        if p.dtype != q.dtype or p.shape != q.shape or p.tobytes() != q.tobytes():
            diff = "-" if p.shape != q.shape else int((p != q).sum())
            rows.append(f"| {name} | {p.dtype}{list(p.shape)} vs {q.dtype}{list(q.shape)} | {diff} | |")
    return len(set(x) | set(y)), rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--out")
    args = p.parse_args(argv)
    n, rows = compare(args.a, args.b)
    text = f"{args.a} vs {args.b}: {n} initializers, {len(rows)} differ\n"
    if rows:
        header = "| initializer | dtype / shape | elements that differ | |\n|---|---|---|---|\n"
        text += "\n" + header + "\n".join(rows) + "\n"
    emit(text, args.out)
    return 0 if not rows else 1


if __name__ == "__main__":
    sys.exit(main())
