"""The qcompiler exception family.

Every error a user can cause is a :class:`QCompileError`. Its message says what was wrong, where
(file, node, layer) and what to do; the CLI prints it on one line without a traceback and exits
non-zero.
"""

from __future__ import annotations


class QCompileError(Exception):
    """Base class of every error qcompiler raises on purpose."""


class ConfigError(QCompileError):
    """Bad configuration: unknown target or method, bits out of range, bad override."""


class ModelFileError(QCompileError):
    """A model file that cannot be loaded or lacks the functions the contract requires."""


class CaptureError(QCompileError):
    """Neither fx.symbolic_trace nor torch.export could capture the model."""


class CalibrationDataError(QCompileError):
    """Calibration data that is empty, non-finite, or does not fit the model's inputs."""


class PreconditionError(QCompileError):
    """A pass was asked to run on a program that does not meet its requirements."""


class PostconditionError(QCompileError):
    """A pass finished without establishing what it promises (a bug in qcompiler)."""


class LoweringError(QCompileError):
    """The quantized program cannot be expressed on the chosen target."""


class VerificationError(QCompileError):
    """The deployed model failed a check: float kernels left, or outputs that disagree."""


class OutputError(QCompileError):
    """An output file or directory that cannot be written."""
