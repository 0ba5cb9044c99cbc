"""The ground floor: Program, op registry, pass contract and Target protocol."""

from qcompiler.ir.passes import Pass, PassResult
from qcompiler.ir.program import Lowered, Program, ProgramState, Unit
from qcompiler.ir.target import Placement, Target

__all__ = ["Lowered", "Pass", "PassResult", "Placement", "Program", "ProgramState", "Target", "Unit"]
