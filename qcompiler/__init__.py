"""qcompiler: a post-training quantization compiler for PyTorch.

``compile`` and ``Pipeline`` are loaded lazily so importing the ground floor (``qcompiler.ir``,
``qcompiler.quantizers``) never drags in every pass and backend.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["Pipeline", "QCompileError", "compile"]


def __getattr__(name: str) -> Any:
    if name == "compile":
        from qcompiler.api import compile as fn

        return fn
    if name == "Pipeline":
        from qcompiler.pipeline import Pipeline

        return Pipeline
    if name == "QCompileError":
        from qcompiler.errors import QCompileError

        return QCompileError
    raise AttributeError(f"module 'qcompiler' has no attribute {name!r}")
