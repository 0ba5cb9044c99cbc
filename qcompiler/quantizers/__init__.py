"""Quantizer numerics, one file per family."""

from qcompiler.quantizers.uniform import QSpec, UniformQuantizer, fake_quant

__all__ = ["QSpec", "UniformQuantizer", "fake_quant"]
