"""Methods as recipes: what each ``--method`` name runs.

A :class:`Method` is a pass sequence (pass names the pipeline knows; the target's lowering and
checks follow it) and the knob values it starts from, among them the quantizer family each tensor
kind learns in reconstruction (``weight_quantizer``, ``act_quantizer``: names of
``qcompiler.quantizers.FAMILIES``), the unit granularity and the QDrop probability. A recipe file,
``--recipe`` or explicit options override those values (``qcompiler.config.resolve``).

A new method is one :func:`register` call; where it brings new numerics, one quantizer family file
in ``qcompiler/quantizers/`` beside it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

#: Capture, canonical forms (attention as matmuls, parameter products as linear layers), BatchNorm
#: folding, outlier channels split (when asked), quantizer insertion and calibration: round to nearest.
RTN = ("trace", "decompose_attention", "linear_forms", "fold_bn", "split_outliers", "insert_quantizers", "calibrate")
#: Then reconstruction unit by unit (units merged by MRECG when the granularity asks for it);
#: activations it did not learn are calibrated again after it.
RECONSTRUCTION = (*RTN, "partition", "mrecg", "reconstruct", "recalibrate")


@dataclass(frozen=True)
class Method:
    """One ``--method``: its pass sequence and the knob values it sets."""

    name: str
    help: str
    passes: tuple[str, ...] = RTN
    defaults: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "defaults", MappingProxyType(dict(self.defaults)))


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add ``method`` to the table ``--method`` reads (a name may not be taken twice)."""
    if method.name in METHODS:
        raise ValueError(f"method {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


register(Method("rtn", "round to nearest, ranges from calibration"))
register(Method("adaround", "AdaRound: learned weight rounding layer by layer, float activations in the loop",
                RECONSTRUCTION, {"granularity": "layer", "weight_quantizer": "adaround", "qdrop": 1.0}))
register(Method("brecq", "BRECQ: learned weight rounding block by block, float activations in the loop",
                RECONSTRUCTION, {"granularity": "block", "weight_quantizer": "adaround", "qdrop": 1.0}))
register(Method("qdrop", "QDrop: BRECQ with LSQ activation steps, each activation dropped to float at 0.5",
                RECONSTRUCTION, {"granularity": "block", "weight_quantizer": "adaround", "act_quantizer": "lsq",
                                 "qdrop": 0.5}))
register(Method("flexround", "FlexRound: element-wise learned weight grid divisors, block by block, float activations "
                "in the loop (the paper's BRECQ setting); its rate cosine-decayed to 0 over each unit", RECONSTRUCTION,
                {"granularity": "block", "weight_quantizer": "flexround", "qdrop": 1.0, "w_lr": 1e-3,
                 "w_lr_decay": True}))
register(Method("flexround-qdrop", "FlexRound in QDrop's setting: LSQ activation steps, activations dropped to float "
                "at 0.5", RECONSTRUCTION,
                {"granularity": "block", "weight_quantizer": "flexround", "act_quantizer": "lsq", "qdrop": 0.5,
                 "w_lr": 1e-3, "w_lr_decay": True}))
register(Method("mrbiq", "Mr.BiQ: binary-coded weights (sum of bits +-1 codes times per-channel scales), codes and "
                "scales learned block by block; no integer form (deploy with --target onnx-fp)", RECONSTRUCTION,
                {"granularity": "block", "weight_quantizer": "mrbiq", "qdrop": 1.0, "w_lr": 1e-2,
                 "w_step_lr": 1e-3}))
register(Method("mrbiq-uniform", "Mr.BiQ-Uniform: the binary codes of the calibrated uniform grid's integers and its "
                "step learned block by block; lowers to integer kernels", RECONSTRUCTION,
                {"granularity": "block", "weight_quantizer": "mrbiq-uniform", "qdrop": 1.0, "w_lr": 1e-2,
                 "w_step_lr": 1e-3}))
