"""calibrate: initialise every quantizer's step size and zero point.

Rule: weight quantizers are initialised from their weights (``w_init``: min-max, or ``mse``: the
per-channel grid that minimises the mean ``|w - fq(w)|^p``, ``quantizers.ranges``); activation
quantizers observe the calibration batches while weights are already quantized and activations
still float, then take their range from what they saw (``a_init``: min-max, the same search with
the exponent ``a_mse_p``, or the percentile clip).
Afterwards every quantizer fake-quantizes: the program computes what round-to-nearest deploys.

``Calibrate(weights=False)`` (pass name ``recalibrate``) keeps the weight quantizers as they are and
only re-observes the activations, unless reconstruction learned them
(``program.state.activations_learned``): the methods that reconstruct weights with float
activations (AdaRound, BRECQ) calibrate their activations after, on the reconstructed weights.
"""

from __future__ import annotations

import logging

import torch
from tqdm.auto import tqdm

from qcompiler.errors import CalibrationDataError, PostconditionError, PreconditionError
from qcompiler.ir import registry
from qcompiler.ir.passes import Pass, PassResult, require_graph
from qcompiler.ir.program import Program, check_calibration, run_calibration

log = logging.getLogger("qcompiler.calibrate")


class Calibrate(Pass):
    """Initialise weight quantizers from weights and activation quantizers from calibration data."""

    name = "calibrate"

    def __init__(self, weights: bool = True) -> None:
        self.weights = weights
        if not weights:
            self.name = "recalibrate"

    def requires(self, program: Program) -> None:
        require_graph(program, self.name)
        if not any(True for _ in program.quantizer_nodes()):
            raise PreconditionError("calibrate needs quantizers: run insert_quantizers first")
        check_calibration(program.calib, program.example_inputs, dims=program.dynamic_dims)

    def run(self, program: Program) -> PassResult:
        if not self.weights and program.state.activations_learned:
            return PassResult(False, {"skipped": "reconstruction learned the activations"})
        gm, cfg = program.gm, program.config.quant
        for node in program.quantizer_nodes("weight") if self.weights else []:
            q = gm.get_submodule(node.target)
            w_node = node.args[0]
            q.init_from_tensor(gm.get_parameter(str(w_node.target)) if _is_param(gm, w_node.target)
                               else gm.get_buffer(str(w_node.target)), cfg.w_init)
            q.mode = "quant"
        acts = [gm.get_submodule(n.target) for n in program.quantizer_nodes("act")]
        for q in acts:
            q.mode = "observe"
            q.observer = None
        torch.manual_seed(cfg.seed)
        run_calibration(gm, program, tqdm(program.calib, desc=self.name, unit="batch", leave=False,
                                          disable=not log.isEnabledFor(logging.INFO)))
        for node, q in zip(program.quantizer_nodes("act"), acts, strict=True):
            try:
                q.init_from_observer(cfg.a_init, cfg.percentile, cfg.a_mse_p)
            except RuntimeError as exc:
                raise CalibrationDataError(f"activation quantizer {node.name} saw no data") from exc
            q.mode = "quant"
        widened = self._fit_biases(program) if self.weights else 0
        program.state.calibrated = True
        return PassResult(True, {"weights": sum(1 for _ in program.quantizer_nodes("weight")) if self.weights else 0,
                                 "activations": len(acts), "batches": len(program.calib),
                                 "widened_for_bias": widened})

    @staticmethod
    def _fit_biases(program: Program) -> int:
        """Each bias quantizer widens the weight steps its bias needs (``BiasQuantizer.fit_weight_step``);
        returns the number of channels widened."""
        gm = program.gm
        widened = 0
        for node in program.quantizer_nodes("bias"):
            n = gm.get_submodule(node.target).fit_weight_step(registry.get_tensor(gm, str(node.args[0].target)))
            if n:
                log.info("%s: weight step of %d channel(s) widened so that the bias fits int32", node.name, n)
            widened += n
        return widened

    def ensures(self, program: Program) -> None:
        for node in [*program.quantizer_nodes("act"), *program.quantizer_nodes("weight")]:
            q = program.gm.get_submodule(node.target)
            if not hasattr(q, "scale"):  # a family without a step (binary-coded weights)
                continue
            if not torch.isfinite(q.scale).all() or (q.scale <= 0).any():
                raise PostconditionError(f"quantizer {node.name} got a non-positive or non-finite step size")


def _is_param(gm: torch.nn.Module, target: str) -> bool:
    try:
        gm.get_parameter(target)
        return True
    except AttributeError:
        return False
