"""Reconstruction checkpoints: resume after the last finished unit, never from stale state.

Rule: after every unit the quantizers' state, the number of finished units and their records are
written atomically to ``WORK_DIR/reconstruct.ckpt`` with a signature: a SHA-256 over the knobs that
can change the result (``CompileConfig.fingerprint``), the unit partition, every tensor of the
program as reconstruction starts (weights and calibrated quantizers) and the calibration data. A
checkpoint is resumed only when its signature is this run's; otherwise the run says why and starts
over.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import fx

from qcompiler.passes.reconstruct.qdrop import memory_order

log = logging.getLogger("qcompiler.reconstruct")

CHECKPOINT = "reconstruct.ckpt"


def _update(h: Any, t: torch.Tensor) -> None:
    """Hash ``t``'s dtype, shape and values in memory order, without copying a dense tensor (the
    calibration data is the size of the whole image set)."""
    t = t.detach().cpu()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    if t.numel():
        flat = memory_order(t) if t.dim() == 4 else t.reshape(-1)
        h.update(flat.contiguous().view(torch.uint8).numpy())


def signature(fingerprint: dict, units: list[str], gm: fx.GraphModule, data: list[torch.Tensor]) -> str:
    """The hex SHA-256 of the run's result-changing knobs, units, program tensors and data."""
    h = hashlib.sha256()
    h.update(json.dumps({"config": fingerprint, "units": units}, sort_keys=True, default=str).encode())
    for name, t in gm.state_dict().items():
        h.update(name.encode())
        _update(h, t)
    for t in data:
        _update(h, t)
    return h.hexdigest()


def load(path: Path | None, sig: str) -> dict | None:
    """The checkpoint at ``path`` if it was written for ``sig``; else None, and the log says why."""
    if path is None or not path.exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("signature") != sig:
        log.warning("not resuming from %s: it was written for other weights, data or settings; "
                    "reconstruction starts over", path)
        return None
    return state


def save(path: Path, gm: fx.GraphModule, done: int, records: list, sig: str) -> None:
    """Write the quantizers' state after ``done`` finished units, atomically."""
    state = {"model": {k: v for k, v in gm.state_dict().items() if k.startswith("qc_")},
             "done": done, "records": records, "signature": sig}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
