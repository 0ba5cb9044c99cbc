"""The Target protocol: what a pass may ask of the deployment target.

Passes never import a backend. Where a pass needs the target's rules (where quantizers go, which
integer containers hold values) it reads ``program.target``, an object implementing this protocol
that ``compile()`` chose from the config and a backend provides.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable


@dataclass(frozen=True)
class Placement:
    """Where quantizers go so that the fake-quant graph computes what the integer graph computes.

    - ``compute_inputs``: quantize every activation input of conv/linear/matmul (their weights too).
    - ``compute_outputs``: quantize the output of every compute op, after the clamp-like activations
      that follow it alone (relu, relu6, clamp), so the integer kernel can requantize its result.
    - ``float_output_kinds``: compute kinds whose integer kernels can also write float outputs (ONNX
      Runtime's QGemm and MatMulIntegerToFloat): their outputs are requantized only where an
      integer kernel reads them, and a join of such an output stays float.
    - ``join_kinds``: joins (e.g. ``add``) whose inputs and output are quantized so they run as
      integer ops too.
    - ``graph_outputs``: quantize the model outputs.
    - ``act_signed`` / ``weight_signed``: the integer container of activations and weights
      (False = uint8, True = int8).
    - ``act_storage_bits``: the width of that activation container; tensors no compute op reads
      (add operands, graph outputs) are quantized at it.
    - ``max_weight_bits``: the widest weight grid the target computes exactly (7 where u8 x s8
      products are summed pairwise in saturating int16, as on x86 without VNNI).
    - ``max_weight_bits_depthwise``: the same for depthwise convs, whose kernels may accumulate
      differently.
    - ``weight_zero_point_zero``: the integer kernels take only zero weight zero points (ONNX
      Runtime's QLinearConv with per-channel weights); asymmetric weights are then stored centered.
    - ``bias_on_accumulator``: compute ops add their bias on an int32 accumulator, so biases are
      quantized to its grid (False: the compute runs in float and the bias stays float).
    - ``float_quantizers``: the target runs quantizers as float operations, so quantizer families
      without an integer form (``integer_form = False``) are deployable.
    """

    compute_inputs: bool = True
    compute_outputs: bool = True
    float_output_kinds: frozenset[str] = frozenset()
    join_kinds: frozenset[str] = frozenset({"add"})
    graph_outputs: bool = True
    act_signed: bool = False
    act_storage_bits: int = 8
    weight_signed: bool = True
    max_weight_bits: int = 8
    max_weight_bits_depthwise: int = 8
    weight_zero_point_zero: bool = True
    bias_on_accumulator: bool = True
    float_quantizers: bool = False


@runtime_checkable
class Target(Protocol):
    """A deployment target: a name, its placement rules, the quantization spec of every node
    (``annotate``), and the passes that lower and verify for it."""

    name: str

    def placement(self) -> Placement:
        """The quantizer placement rules of this target."""
        ...

    def annotate(self, gm, quant):  # noqa: ANN001, ANN201 - (fx.GraphModule, QuantConfig) -> Annotations
        """Per node, what to quantize and how (``qcompiler.ir.annotation.Annotations``)."""
        ...

    def lowering_passes(self) -> list:
        """Passes that turn the calibrated fake-quant program into the deployed artifact and check it."""
        ...
