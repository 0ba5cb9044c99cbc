"""The compile configuration every pass reads (``program.config``)."""

from __future__ import annotations

import fnmatch
import re
from dataclasses import asdict, dataclass, field

from qcompiler.errors import ConfigError

METHODS = ("rtn", "adaround", "brecq", "qdrop")
GRANULARITIES = ("layer", "block")
# method -> (granularity, QDrop probability): adaround is layer-wise with float activations in the
# loop, brecq block-wise with float activations, qdrop block-wise with activations dropped at 0.5.
METHOD_DEFAULTS = {"adaround": ("layer", 1.0), "brecq": ("block", 1.0), "qdrop": ("block", 0.5)}
ACT_INITS = ("minmax", "mse", "percentile")
WEIGHT_INITS = ("minmax", "mse")
#: Default learning rates of AdaRound's alphas and LSQ's activation steps, set for LR_ITERS
#: iterations per unit; longer runs divide them by iters / LR_ITERS.
W_LR, A_LR, LR_ITERS = 1e-2, 4e-5, 2000

_BITS_RE = re.compile(r"^w(\d+)a(\d+)$")


def parse_bits(text: str) -> tuple[int, int]:
    """Parse ``"w4a8"`` into ``(4, 8)``; both widths must lie in 2..8."""
    m = _BITS_RE.match(text.strip().lower())
    if not m:
        raise ConfigError(f"bits {text!r} is not of the form wNaM (for example w8a8, w4a4, w2a4)")
    w, a = int(m.group(1)), int(m.group(2))
    for name, b in (("weight", w), ("activation", a)):
        if not 2 <= b <= 8:
            raise ConfigError(f"{name} bits {b} in {text!r} is outside 2..8; integer targets hold 2- to 8-bit values")
    return w, a


@dataclass
class QConfig:
    """What to quantize and how.

    ``overrides`` maps a layer-name glob (as in ``layer1.*.conv1``) to a bits string like ``"w8a8"``;
    the weight width applies to the layer's weights and the activation width to its inputs.
    """

    w_bits: int = 8
    a_bits: int = 8
    method: str = "rtn"
    target: str = "onnx-int8"
    per_channel: bool = True
    # None (default) / False: asymmetric weights where the target holds them (centered, see
    # uniform.py), symmetric elsewhere; False also logs the layers that stay symmetric. True:
    # symmetric everywhere.
    w_symmetric: bool | None = None
    w_midrise: int = 2  # grids of at most this many bits may sit half a step off zero (0: never)
    # a_bits applies to what compute ops read; True: also to tensors only adds and outputs read
    a_bits_all: bool = False
    reduce_range: bool = True
    first_last_8bit: bool = True
    w_init: str = "mse"
    a_init: str = "mse"
    percentile: float = 99.99
    overrides: dict[str, str] = field(default_factory=dict)
    seed: int = 0
    # The target's check of the lowered model, on ``verify_samples`` inputs calibration never saw: at
    # least ``min_agreement`` top-1 agreement (classifier outputs) and, on every sample, a relative
    # error ||ort - fake_quant|| / ||fake_quant|| of at most ``max_error`` (0: bit for bit).
    verify_samples: int = 256
    min_agreement: float = 0.99
    max_error: float = 0.01
    iters: int = 20000
    batch_size: int = 32
    # None: adaround_lr() / lsq_lr() pick the default for ``iters``. AdaRound's alphas start within
    # about 2.5 of the rectified sigmoid's ends and Adam moves them by about lr per step: the papers'
    # 1e-3 leaves most of them where they started in 2000 iterations (ResNet-20 W2A4 qdrop at 2000:
    # 76.7 with 1e-3, 78.7 with 1e-2, 78.4 with 3e-2; bench/results/recon_resnet20_qdrop2000.md).
    w_lr: float | None = None
    a_lr: float | None = None
    reg_weight: float = 0.01
    w_step_lr: float = 0.0  # > 0: also learn each weight channel's step, Adam lr relative to the step
    bias_correct: bool = False  # reconstruction: empirical bias correction of each unit's layers
    holdout: int = 0  # reconstruction: the last N calibration samples are not trained on, only measured
    qdrop: float | None = None
    granularity: str | None = None
    work_dir: str | None = None
    cache_mb: int = 4096  # reconstruction caches beyond this spill to memory-mapped files

    def __post_init__(self) -> None:
        for name, b in (("w_bits", self.w_bits), ("a_bits", self.a_bits)):
            if not isinstance(b, int) or not 2 <= b <= 8:
                raise ConfigError(f"{name}={b!r} is outside 2..8")
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.w_init not in WEIGHT_INITS:
            raise ConfigError(f"unknown weight init {self.w_init!r}; choose one of {', '.join(WEIGHT_INITS)}")
        if self.a_init not in ACT_INITS:
            raise ConfigError(f"unknown activation init {self.a_init!r}; choose one of {', '.join(ACT_INITS)}")
        if not 50.0 < self.percentile <= 100.0:
            raise ConfigError(f"percentile {self.percentile} must lie in (50, 100]")
        if self.qdrop is not None and not 0.0 <= self.qdrop <= 1.0:
            raise ConfigError(f"qdrop probability {self.qdrop} must lie in [0, 1]")
        if self.granularity is not None and self.granularity not in GRANULARITIES:
            raise ConfigError(f"unknown granularity {self.granularity!r}; choose one of {', '.join(GRANULARITIES)}")
        for name, lr in (("w_lr", self.w_lr), ("a_lr", self.a_lr)):
            if lr is not None and not lr > 0:
                raise ConfigError(f"{name}={lr} must be positive")
        if not isinstance(self.verify_samples, int) or self.verify_samples < 1:
            raise ConfigError(f"verify_samples={self.verify_samples!r} must be a positive integer: the lowered "
                              "model is always checked")
        if not isinstance(self.min_agreement, (int, float)) or not 0.0 < self.min_agreement <= 1.0:
            raise ConfigError(f"min_agreement={self.min_agreement!r} must lie in (0, 1]: 0 would pass any model")
        if not isinstance(self.max_error, (int, float)) or not 0.0 <= self.max_error < 1.0:
            raise ConfigError(f"max_error={self.max_error!r} must lie in [0, 1): a relative error of 1 or more "
                              "would pass outputs that have nothing to do with the fake-quant model's")
        if self.holdout < 0:
            raise ConfigError(f"holdout={self.holdout} must be >= 0")
        if self.iters < 0 or self.batch_size < 1:
            raise ConfigError(f"iters ({self.iters}) must be >= 0 and batch size ({self.batch_size}) >= 1")
        for pattern, bits in self.overrides.items():
            parse_bits(bits)
            if not pattern:
                raise ConfigError("an override needs a layer-name pattern, as in layer1.*=w8a8")

    def bits_for(self, layer: str, first_or_last: bool) -> tuple[int, int]:
        """(weight bits, input-activation bits) for one layer: overrides win, then the 8-bit ends."""
        for pattern, bits in self.overrides.items():
            if fnmatch.fnmatchcase(layer, pattern):
                return parse_bits(bits)
        if first_or_last and self.first_last_8bit:
            return 8, 8
        return self.w_bits, self.a_bits

    def _lr_scale(self) -> float:
        return min(1.0, LR_ITERS / max(self.iters, 1))

    def adaround_lr(self) -> float:
        """AdaRound's Adam learning rate: ``w_lr``, or 1e-2 scaled down beyond 2000 iterations.

        At 20000 iterations that gives the papers' 1e-3. ResNet-20 W4A4 qdrop at 20000 iterations
        reached 80.17 with 1e-2 and 80.02 with 1e-3 alone, 80.47 with both learning rates scaled
        (2000 iterations: 80.28; bench/results/recon_resnet20_qdrop20000.md).
        """
        return self.w_lr if self.w_lr is not None else W_LR * self._lr_scale()

    def lsq_lr(self) -> float:
        """The activation steps' Adam learning rate: ``a_lr``, or 4e-5 scaled as ``adaround_lr``."""
        return self.a_lr if self.a_lr is not None else A_LR * self._lr_scale()

    def qdrop_prob(self) -> float:
        """The QDrop probability in force: explicit, else the method's default."""
        if self.qdrop is not None:
            return self.qdrop
        return METHOD_DEFAULTS.get(self.method, ("block", 1.0))[1]

    def unit_granularity(self) -> str:
        if self.granularity is not None:
            return self.granularity
        return METHOD_DEFAULTS.get(self.method, ("block", 1.0))[0]

    def to_dict(self) -> dict:
        return asdict(self)
