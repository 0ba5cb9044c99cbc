"""Logging set-up shared by the CLI, the benches and the tests."""

from __future__ import annotations

import logging
import warnings

# Loggers of the exporter stack that report internals (initializer dedup, torchvision ops skipped,
# constant folding decisions) at INFO/WARNING on every compile.
EXPORTER_LOGGERS = ("onnx_ir", "onnxscript", "torch.onnx", "torch.onnx._internal.exporter._registration",
                    "torch.export", "torch._export.non_strict_utils", "torch._dynamo", "torch.fx", "torch.__trace")


def quiet_exporters() -> None:
    """Silence the exporter stack's chatter (errors still show) and its deprecation warnings."""
    for name in EXPORTER_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
