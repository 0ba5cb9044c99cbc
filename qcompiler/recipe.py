"""Recipe files: a compile's knobs as TOML.

A recipe holds the same keys as the command-line flags (``qcompile --help``; dashes or
underscores), flat, with per-layer bits in an ``[overrides]`` table::

    method = "qdrop"
    bits = "w4a4"
    iters = 2000

    [overrides]
    "layer1.*" = "w8a8"

``qcompile MODEL.py --recipe r.toml`` reads one; flags given beside it win. ``--report DIR``
writes the resolved configuration as ``DIR/recipe.toml``: every knob with its value (knobs left at
an automatic default, such as ``w_lr``, are omitted), so the run repeats from it.
"""

from __future__ import annotations

import json
import math
import os
import tomllib
from typing import Any

from qcompiler.config import CompileConfig
from qcompiler.errors import ConfigError


def load_recipe(path: str | os.PathLike) -> dict[str, Any]:
    """The key/value pairs of a recipe file (checked against the knobs by ``config.resolve``)."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"recipe {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read recipe {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"recipe {path} is not valid TOML: {exc}") from None


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            raise ValueError(f"{v} has no TOML form here")
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string
    if isinstance(v, list):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    raise TypeError(f"no TOML form for {type(v).__name__}")


def dump_recipe(config: CompileConfig, header: str = "") -> str:
    """``config`` as a recipe file that resolves to the same configuration."""
    lines = [f"# {ln}" for ln in header.splitlines()]
    tables: dict[str, dict] = {}
    for key, value in config.flat().items():
        if value is None:
            continue
        if isinstance(value, dict):
            tables[key] = value
        else:
            lines.append(f"{key} = {_value(value)}")
    for key, table in tables.items():
        lines += ["", f"[{key}]"] + [f"{_value(str(k))} = {_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"

