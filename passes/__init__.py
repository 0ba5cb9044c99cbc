"""Passes over the Program, one per module (imported as ``qcompiler.passes``)."""

from qcompiler.passes.calibrate import Calibrate
from qcompiler.passes.decompose_attention import DecomposeAttention
from qcompiler.passes.fold_bn import FoldBatchNorm
from qcompiler.passes.insert_quantizers import InsertQuantizers
from qcompiler.passes.linear_forms import LinearForms
from qcompiler.passes.mrecg import Mrecg
from qcompiler.passes.partition import Partition
from qcompiler.passes.reconstruct import Reconstruct
from qcompiler.passes.split_outliers import SplitOutliers
from qcompiler.passes.trace import Trace

__all__ = ["Calibrate", "DecomposeAttention", "FoldBatchNorm", "InsertQuantizers", "LinearForms", "Mrecg", "Partition",
           "Reconstruct", "SplitOutliers", "Trace"]
