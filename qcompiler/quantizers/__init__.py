"""Quantizer numerics, one file per family; ``FAMILIES`` names the ones recipes may choose."""

from qcompiler.errors import ConfigError
from qcompiler.quantizers.adaround import AdaRoundQuantizer
from qcompiler.quantizers.flexround import FlexRoundQuantizer
from qcompiler.quantizers.grid import QSpec, fake_quant
from qcompiler.quantizers.lsq import LSQQuantizer
from qcompiler.quantizers.mrbiq import MrBiQQuantizer, MrBiQUniformQuantizer
from qcompiler.quantizers.nulsq import NuLSQQuantizer
from qcompiler.quantizers.uniform import UniformQuantizer

#: Family name (the ``weight_quantizer`` / ``act_quantizer`` knobs) -> quantizer class. ``uniform``
#: learns nothing; the others implement ``family.Trainable``. A family whose class says
#: ``integer_form = False`` has no integer QDQ form: only targets that run quantizers as float ops
#: (``Placement.float_quantizers``) deploy it.
FAMILIES: dict[str, type] = {"uniform": UniformQuantizer, "adaround": AdaRoundQuantizer,
                             "flexround": FlexRoundQuantizer, "lsq": LSQQuantizer, "mrbiq": MrBiQQuantizer,
                             "mrbiq-uniform": MrBiQUniformQuantizer, "nulsq": NuLSQQuantizer}


def family(name: str) -> type:
    """The quantizer class of family ``name``."""
    if name not in FAMILIES:
        raise ConfigError(f"unknown quantizer family {name!r}; choose one of {', '.join(sorted(FAMILIES))}")
    return FAMILIES[name]


__all__ = ["FAMILIES", "QSpec", "UniformQuantizer", "fake_quant", "family"]
