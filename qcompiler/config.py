"""Turning user input (CLI strings, keyword arguments) into a validated QConfig."""

from __future__ import annotations

from typing import Any

from qcompiler.errors import ConfigError
from qcompiler.ir.config import QConfig, parse_bits


def make_config(bits: str = "w8a8", method: str = "rtn", target: str = "onnx-int8",
                overrides: dict[str, str] | list[str] | None = None, **options: Any) -> QConfig:
    """A QConfig from a bits string, a method, a target and options; overrides as ``PATTERN=wNaM``."""
    w, a = parse_bits(bits)
    if isinstance(overrides, list):
        overrides = parse_pairs(overrides, "override")
    unknown = set(options) - set(QConfig.__dataclass_fields__)
    if unknown:
        raise ConfigError(f"unknown option(s) {sorted(unknown)}")
    return QConfig(w_bits=w, a_bits=a, method=method, target=target, overrides=overrides or {}, **options)


def parse_pairs(items: list[str], what: str) -> dict[str, str]:
    """``["k=v", ...]`` to a dict; a clear error for an item without '='."""
    out: dict[str, str] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--{what} {item!r} is not KEY=VALUE")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out
