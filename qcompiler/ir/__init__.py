"""The ground floor: Program, op registry, pass contract, configuration and Target protocol."""

from qcompiler.ir.config import QConfig, parse_bits
from qcompiler.ir.passes import Pass, PassResult
from qcompiler.ir.program import Program
from qcompiler.ir.target import Placement, Target

__all__ = ["Pass", "PassResult", "Placement", "Program", "QConfig", "Target", "parse_bits"]
