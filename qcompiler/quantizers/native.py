"""Native (C) kernels for the reconstruction hot path, built on first use with the system C compiler.

Reconstruction on a CPU is bound by memory traffic, not arithmetic: LSQ fake quantization composed
from torch's elementwise ops (divide, round, clamp, multiply, mix, and their backwards) makes about a
dozen passes over every activation per step. ``csrc/lsq.c`` does the forward and the backward in one
pass each, on torch's OpenMP threads: built with ``-fopenmp`` by GCC and loaded after torch, it binds
to the ``libgomp.so.1`` torch brought (a compiler with another OpenMP runtime would start a second
pool of threads, which competes with torch's). The library is compiled once per source version and
CPU into ``$QCOMPILER_CACHE`` (default ``~/.cache/qcompiler``); without a working ``cc`` every
caller falls back to the torch composition, which computes the same values (a test checks both
paths agree), only slower.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger("qcompiler.native")

SOURCES = [Path(__file__).with_name("csrc") / name for name in ("lsq.c", "nulsq.c")]
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fopenmp", "-fPIC", "-shared"]
_lib: ctypes.CDLL | None = None
_tried = False


def _cache_dir() -> Path:
    return Path(os.environ.get("QCOMPILER_CACHE", Path.home() / ".cache" / "qcompiler"))


def _cpu_tag() -> str:
    """What ``-march=native`` depends on: the architecture and the CPU's feature flags."""
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return platform.machine() + flags


def _build() -> ctypes.CDLL:
    src = b"".join(f.read_bytes() for f in SOURCES)
    tag = hashlib.sha256(src + " ".join(FLAGS).encode() + _cpu_tag().encode()).hexdigest()[:16]
    lib = _cache_dir() / f"qc_native_{tag}.so"
    if not lib.exists():
        lib.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
            out = Path(tmp) / lib.name
            subprocess.run([os.environ.get("CC", "cc"), *FLAGS, "-o", str(out), *map(str, SOURCES), "-lm"],
                           check=True, capture_output=True, timeout=120)
            os.replace(out, lib)  # atomic: concurrent builders cannot leave a half-written library
    dll = ctypes.CDLL(str(lib))
    f32p, u8p, i64, f32 = ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
    dll.qc_lsq_forward.argtypes = [f32p, f32p, f32p, u8p, i64, f32, f32, f32]
    dll.qc_lsq_forward.restype = None
    dll.qc_lsq_backward.argtypes = [f32p, f32p, u8p, f32p, f32p, i64, f32, f32, f32]
    dll.qc_lsq_backward.restype = ctypes.c_double
    dll.qc_lsq_blocks.argtypes = [i64]
    dll.qc_lsq_blocks.restype = i64
    dll.qc_nulsq_forward.argtypes = [f32p, f32p, f32p, f32p, i64, f32, f32, f32p, u8p, i64]
    dll.qc_nulsq_forward.restype = None
    dll.qc_nulsq_backward.argtypes = [f32p, f32p, u8p, f32p, f32p, i64, f32, f32p, f32p, ctypes.c_void_p, i64]
    dll.qc_nulsq_backward.restype = None
    dll.qc_nulsq_blocks.argtypes = [i64]
    dll.qc_nulsq_blocks.restype = i64
    return dll


def library() -> ctypes.CDLL | None:
    """The loaded kernel library, or None when it cannot be built here (or QCOMPILER_NATIVE=0)."""
    global _lib, _tried
    if not _tried:
        _tried = True
        if os.environ.get("QCOMPILER_NATIVE", "1") != "0":
            try:
                _lib = _build()
            except (OSError, subprocess.SubprocessError) as exc:
                detail = getattr(exc, "stderr", b"") or b""
                log.info("native kernels unavailable (%s %s); using the torch composition",
                         type(exc).__name__, detail.decode(errors="replace").strip()[:200])
    return _lib


def dense(x: torch.Tensor) -> bool:
    """Whether ``x`` fills its memory without gaps in a layout ``empty_like`` reproduces (contiguous
    or channels-last): the kernels walk raw memory, so every tensor of one call shares that layout."""
    return x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))


def usable(x: torch.Tensor, keep: torch.Tensor | None = None) -> bool:
    """Whether the kernels can take ``x`` (and its keep-mask, which must have ``x``'s memory layout)."""
    return (x.dtype == torch.float32 and x.device.type == "cpu" and dense(x)
            and (keep is None or (keep.dtype == torch.float32 and keep.stride() == x.stride())))


def lsq_forward(x: torch.Tensor, keep: torch.Tensor | None, s: float, lo: float, hi: float
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, code)``: the fake-quantized (or kept) values and a per-element byte for the backward."""
    lib = library()
    out = torch.empty_like(x)
    code = torch.empty_like(x, dtype=torch.uint8)
    lib.qc_lsq_forward(x.data_ptr(), keep.data_ptr() if keep is not None else None, out.data_ptr(),
                       code.data_ptr(), x.numel(), s, lo, hi)
    return out, code


def lsq_backward(g: torch.Tensor, x: torch.Tensor, code: torch.Tensor, s: float, lo: float, hi: float
                 ) -> tuple[torch.Tensor, float]:
    """``(grad_x, d loss / d s before LSQ's factor)``."""
    lib = library()
    if g.stride() != x.stride():  # walk g's memory in x's order
        g = torch.empty_like(x).copy_(g)
    gx = torch.empty_like(g)
    part = torch.empty(lib.qc_lsq_blocks(x.numel()), dtype=torch.float32)
    gs = lib.qc_lsq_backward(g.data_ptr(), x.data_ptr(), code.data_ptr(), gx.data_ptr(), part.data_ptr(), x.numel(),
                             s, lo, hi)
    return gx, gs


def nulsq_forward(x: torch.Tensor, keep: torch.Tensor | None, levels: torch.Tensor, steps: torch.Tensor,
                  lo: float, hi: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, code)`` of nuLSQ's table ``levels`` (from ``steps``); ``lo``/``hi`` bound the range."""
    lib = library()
    levels, steps = levels.detach().float().contiguous(), steps.detach().float().contiguous()
    out = torch.empty_like(x)
    code = torch.empty_like(x, dtype=torch.uint8)
    lib.qc_nulsq_forward(x.data_ptr(), keep.data_ptr() if keep is not None else None, levels.data_ptr(),
                         steps.data_ptr(), steps.numel(), lo, hi, out.data_ptr(), code.data_ptr(), x.numel())
    return out, code


def nulsq_backward(g: torch.Tensor, x: torch.Tensor, code: torch.Tensor, levels: torch.Tensor, steps: torch.Tensor,
                   lo: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(grad_x, sums)``: ``sums[m]`` the interval terms of step ``m``, then the gradient summed below
    and above the range (``csrc/nulsq.c``), in float64."""
    lib = library()
    levels, steps = levels.detach().float().contiguous(), steps.detach().float().contiguous()
    if g.stride() != x.stride():
        g = torch.empty_like(x).copy_(g)
    gx = torch.empty_like(g)
    n = steps.numel()
    part = torch.empty(lib.qc_nulsq_blocks(x.numel()) * (n + 2), dtype=torch.float32)
    sums = torch.empty(n + 2, dtype=torch.float64)
    lib.qc_nulsq_backward(g.data_ptr(), x.data_ptr(), code.data_ptr(), levels.data_ptr(), steps.data_ptr(), n, lo,
                          gx.data_ptr(), part.data_ptr(), sums.data_ptr(), x.numel())
    return gx, sums
