"""The calibration set's activations at unit boundaries, and the allocator setting training wants."""

from __future__ import annotations

import ctypes
import tempfile
from pathlib import Path

import numpy as np
import torch

from qcompiler.passes.reconstruct.qdrop import in_layout_of, memory_order


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory for reuse instead of handing it back to the kernel.

    A training step allocates and frees dozens of activation-sized tensors. With glibc's defaults
    those come from fresh ``mmap`` pages or a heap top that is trimmed again after the step, so every
    step pays page faults on memory it already had. Raising the mmap and trim thresholds keeps the
    pages mapped; memory stays bounded by the largest step. Returns False where this is not glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, 32 << 20) and libc.mallopt(m_trim_threshold, 1 << 30))
    except (OSError, AttributeError):
        return False


class ActivationCache:
    """The calibration set's values at unit boundaries, in memory up to a budget, then on disk.

    ``put`` keeps a tensor in memory while the total stays within ``budget_bytes``; beyond that the
    tensor is written to a memory-mapped file under ``directory`` (the work directory, or a temporary
    one) and the returned tensor reads from it, so the operating system's page cache, not the
    process, decides what stays resident. ``drop`` forgets a value (and deletes its file).
    """

    def __init__(self, budget_bytes: int, directory: str | None) -> None:
        self.budget = budget_bytes
        self.used = 0
        self.values: dict[str, torch.Tensor] = {}
        self.files: dict[str, Path] = {}
        self._tmp = None if directory else tempfile.TemporaryDirectory(prefix="qc_cache_")
        self.dir = Path(directory) / "cache" if directory else Path(self._tmp.name)

    def _shared(self, t: torch.Tensor, but: str | None = None) -> bool:
        """Whether another key holds this very tensor in memory (it is then counted once)."""
        return any(v is t for k, v in self.values.items() if k != but and k not in self.files)

    def put(self, key: str, t: torch.Tensor) -> torch.Tensor:
        self.drop(key)
        nbytes = t.numel() * t.element_size()
        if self._shared(t):
            self.values[key] = t
            return t
        if self.used + nbytes <= self.budget or t.dim() == 0:
            self.used += nbytes
            self.values[key] = t
            return t
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"{len(self.files)}_{key.replace(':', '_')}.bin"
        flat = memory_order(t)  # kept in t's memory layout, so a spilled value computes as t would
        arr = np.memmap(path, dtype=flat.numpy().dtype, mode="w+", shape=(flat.numel(),))
        arr[...] = flat.numpy()
        arr.flush()
        self.files[key] = path
        self.values[key] = in_layout_of(torch.from_numpy(arr), t)
        return self.values[key]

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.values[key]

    def keys(self) -> list[str]:
        return list(self.values)

    def drop(self, key: str) -> None:
        t = self.values.get(key)
        if t is None:
            return
        shared = self._shared(t, but=key)
        del self.values[key]
        path = self.files.pop(key, None)
        if path is None:
            if not shared:
                self.used -= t.numel() * t.element_size()
        else:
            del t
            path.unlink(missing_ok=True)

    def close(self) -> None:
        for key in list(self.values):
            self.drop(key)
        if self._tmp is not None:
            self._tmp.cleanup()
