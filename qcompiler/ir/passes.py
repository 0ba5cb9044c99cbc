"""The pass contract: ``requires`` -> ``run`` -> ``ensures``.

A pass is a small class with a docstring stating its rule. ``requires`` raises
:class:`~qcompiler.errors.PreconditionError` when the program is not ready for it; ``ensures``
raises :class:`~qcompiler.errors.PostconditionError` when the pass failed its promise. ``run``
returns a :class:`PassResult` saying whether it changed the program and what it did, in numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from qcompiler.errors import PreconditionError
from qcompiler.ir.program import Program


@dataclass
class PassResult:
    """What a pass did: ``changed`` and a small dict of counts for the log and the report."""

    changed: bool
    stats: dict[str, Any] = field(default_factory=dict)


class Pass:
    """Base class of every pass. Subclasses set ``name`` and implement ``run``."""

    name: str = "pass"

    def requires(self, program: Program) -> None:
        """Check preconditions; raise PreconditionError if the program is not ready."""

    def run(self, program: Program) -> PassResult:
        raise NotImplementedError

    def ensures(self, program: Program) -> None:
        """Check postconditions; raise PostconditionError if the pass broke its promise."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def require_graph(program: Program, pass_name: str) -> None:
    """Shared precondition: the program has been captured."""
    if program.gm is None:
        raise PreconditionError(f"{pass_name} needs a captured graph: run the trace pass first")
