"""onnx-fp: quantization simulated in float in ONNX Runtime, for quantizers no integer kernel runs.

Rule: the quantizer placement and grids of onnx-int8 (8-bit weights everywhere: no integer kernel
saturates here), but compute ops run in float: every weight becomes a float constant holding its
fake-quantized values (for binary-coded Mr.BiQ weights, the decoded ``sum_i alpha_i b_i``), biases
stay float, and activation quantizers are float arithmetic (Div, Round, Clip, Mul: ``FloatFakeQuant``).
Not QuantizeLinear/DequantizeLinear pairs: ONNX Runtime's optimiser fuses those around a Conv with
a constant float weight into QLinearConv, quantizing the weight again on its own grid.
Dequantized float weights rather than a codebook (uint8 codes, a per-channel table and a Gather):
the Gather form would decode the same floats at run time and feed the same float Conv, so it saves
file size but no compute, and ORT has no kernel that multiplies with the codes directly. The check
compares ORT with the float fake-quant model (no integer-kernel requirement: the plan is float).
"""

from __future__ import annotations

import dataclasses

from qcompiler.backends.onnx_qdq import LowerOnnxQdq, OnnxInt8Target
from qcompiler.ir.passes import Pass
from qcompiler.ir.target import Placement


class LowerOnnxFp(LowerOnnxQdq):
    """Lower the fake-quant program to ONNX in float operations (module docstring)."""

    name = "lower_onnx_fp"
    float_ops = True


class OnnxFpTarget(OnnxInt8Target):
    """Float simulation of the onnx-int8 quantization (module docstring). Weights-only bits (``wN``)
    compile here: activations then stay float."""

    name = "onnx-fp"

    def placement(self) -> Placement:
        return dataclasses.replace(super().placement(), bias_on_accumulator=False, float_quantizers=True,
                                   max_weight_bits=8)

    def lowering_passes(self) -> list[Pass]:
        from qcompiler.backends.ort import VerifyOrt

        return [LowerOnnxFp(), VerifyOrt(self.options, integer=False)]
