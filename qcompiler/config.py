"""The compile configuration: one typed config per stage, every knob one field.

- :class:`QuantConfig`: the quantizers (insert_quantizers, calibrate, the target's annotation);
- :class:`ReconConfig`: reconstruction (partition, reconstruct);
- :class:`TargetOptions`: how the target lowers and checks the model;
- :class:`CompileConfig`: the method, the target and the three stages.

A knob is a dataclass field made with :func:`knob`: its name is the recipe key and the keyword of
``qcompiler.compile``, ``--name-with-dashes`` its command-line flag, its metadata the help text.
The CLI, the API and recipe files are derived from these fields (:func:`knobs`), so adding a knob
is adding one field. Resolution (:func:`resolve`): field defaults, then the method's recipe entry
(``qcompiler.methods``), then a recipe file, then explicit options; later wins.

This module imports no torch: ``qcompile --help`` stays fast.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
import typing
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from qcompiler.errors import ConfigError

ACT_INITS = ("minmax", "mse", "percentile")
WEIGHT_INITS = ("minmax", "mse")
GRANULARITIES = ("layer", "block", "mrecg-modcap", "mrecg-loss")
MRECG_LOSSES = ("absolute", "relative")
#: Default learning rates of the weight rounding and the activation steps, set for LR_ITERS
#: iterations per unit; longer runs divide them by iters / LR_ITERS.
W_LR, A_LR, LR_ITERS = 1e-2, 4e-5, 2000
# The activation range search's default exponent (``a_mse_p``; weights: quantizers.ranges).
ACT_MSE_P = 2.4

_BITS_RE = re.compile(r"^w(\d+)(?:a(\d+))?$")


def knob(default: Any, help: str, *, aliases: tuple[tuple[str, Any], ...] = (), metavar: str | None = None,
         result: bool = True) -> Any:
    """A config field. ``aliases``: other flags, as ``(flag, value)``: ``("--per-tensor", False)`` sets
    the knob to False, ``("--override", None)`` is another spelling of its own flag.
    ``result=False``: the knob cannot change the compiled model."""
    meta = {"help": help, "aliases": aliases, "metavar": metavar, "result": result}
    if isinstance(default, (dict, list)):
        return field(default_factory=type(default), metadata=meta)
    return field(default=default, metadata=meta)


def parse_bits(text: str) -> tuple[int, int | None]:
    """Parse ``"w4a8"`` into ``(4, 8)`` and ``"w2"`` (weights only, float activations) into
    ``(2, None)``; widths must lie in 2..8."""
    m = _BITS_RE.match(str(text).strip().lower())
    if not m:
        raise ConfigError(f"bits {text!r} is not of the form wNaM or wN (for example w8a8, w4a4, w2a4; w2 for "
                          "2-bit weights and float activations)")
    w, a = int(m.group(1)), (int(m.group(2)) if m.group(2) else None)
    for name, b in (("weight", w), ("activation", a)):
        if b is not None and not 2 <= b <= 8:
            raise ConfigError(f"{name} bits {b} in {text!r} is outside 2..8; integer targets hold 2- to 8-bit values")
    return w, a


def _choice(name: str, value: str, choices: typing.Iterable[str]) -> None:
    choices = sorted(choices)
    if value not in choices:
        raise ConfigError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}")


@dataclass
class QuantConfig:
    """What the quantizers are. ``overrides`` maps a layer-name glob (``layer1.*.conv1``) to a bits
    string: its weight width applies to the layer's weights, its activation width to the inputs."""

    bits: str = knob("w8a8", "weight/activation bits, wNaM with N, M in 2..8; wN: weights only, activations stay "
                             "float (a float-simulation target)")
    per_channel: bool = knob(True, "one weight scale per output channel (--no-per-channel: one per tensor)",
                             aliases=(("--per-tensor", False),))
    w_symmetric: bool | None = knob(
        None, "symmetric weights only; --no-w-symmetric: asymmetric wherever the target holds them (the default) and "
              "log the layers where it cannot", aliases=(("--w-asymmetric", False),))
    w_midrise: int = knob(2, "weight grids of at most N bits may sit half a step off zero: symmetric ones use the "
                             "zero-free midrise grid, asymmetric ones half-integer zero points (0: never)",
                          aliases=(("--midrise-bits", None),), metavar="N")
    a_bits_all: bool = knob(False, "also quantize tensors no conv/linear reads (add operands) at the activation width "
                                   "(default: the target's storage width, as they multiply nothing)")
    first_last_8bit: bool = knob(True, "keep the first and last layers at 8 bits")
    w_init: str = knob("mse", "weight range: mse or minmax")
    a_init: str = knob("mse", "activation range: mse, minmax or percentile")
    percentile: float = knob(99.99, "percentile of --a-init percentile")
    a_mse_p: float = knob(ACT_MSE_P, "exponent p of the error |x - fq(x)|^p that --a-init mse minimises (larger p "
                                     "clips less)", metavar="P")
    overrides: dict[str, str] = knob({}, "per-layer bits for layers whose name matches the glob PATTERN (repeatable)",
                                     aliases=(("--override", None),), metavar="PATTERN=wNaM")
    split_outliers: float = knob(0.0, "split the largest input channels of linear layers into equal copies (weights "
                                      "repeated), up to this share of extra channels, so that per-tensor activation "
                                      "steps are not sized by a few outlier channels (0: off)", metavar="SHARE")
    keep_float: list[str] = knob([], "keep the layers whose name matches the glob PATTERN in float: no quantizer on "
                                     "their weights or inputs (repeatable)", metavar="PATTERN")
    seed: int = knob(0, "random seed")

    def __post_init__(self) -> None:
        parse_bits(self.bits)
        if not 0.0 <= self.split_outliers < 1.0:
            raise ConfigError(f"--split-outliers {self.split_outliers}: a share of extra channels in [0, 1)")
        if any(not p for p in self.keep_float):
            raise ConfigError("--keep-float needs a layer-name pattern, as in encoder.layer.0.*")
        _choice("weight init", self.w_init, WEIGHT_INITS)
        _choice("activation init", self.a_init, ACT_INITS)
        if not 50.0 < self.percentile <= 100.0:
            raise ConfigError(f"percentile {self.percentile} must lie in (50, 100]")
        if not 1.0 <= self.a_mse_p <= 8.0:
            raise ConfigError(f"a_mse_p={self.a_mse_p}: the range search's exponent must lie in [1, 8]")
        if self.w_midrise < 0:
            raise ConfigError(f"w_midrise={self.w_midrise} must be >= 0")
        for pattern, bits in self.overrides.items():
            parse_bits(bits)
            if not pattern:
                raise ConfigError("an override needs a layer-name pattern, as in layer1.*=w8a8")

    @property
    def w_bits(self) -> int:
        return parse_bits(self.bits)[0]

    @property
    def a_bits(self) -> int | None:
        """The activation width; None for weights-only bits (``wN``)."""
        return parse_bits(self.bits)[1]

    def kept_float(self, layer: str) -> bool:
        """Whether ``layer`` matches a ``keep_float`` pattern."""
        return any(fnmatch.fnmatchcase(layer, p) for p in self.keep_float)

    def bits_for(self, layer: str, first_or_last: bool) -> tuple[int, int | None]:
        """(weight bits, input-activation bits) for one layer: overrides win, then the 8-bit ends.
        In a weights-only compile activations stay float whatever the override says."""
        weights_only = self.a_bits is None
        for pattern, bits in self.overrides.items():
            if fnmatch.fnmatchcase(layer, pattern):
                w, a = parse_bits(bits)
                return w, None if weights_only else a
        if first_or_last and self.first_last_8bit:
            return 8, None if weights_only else 8
        return self.w_bits, self.a_bits


@dataclass
class ReconConfig:
    """How reconstruction partitions and trains (read by partition and reconstruct)."""

    granularity: str = knob("block", "reconstruction units: layer, block, or blocks with MRECG's merges of adjacent "
                                     "pairs ranked by capacity (mrecg-modcap) or by a probe's losses (mrecg-loss)")
    mrecg_k: int | None = knob(None, "MRECG: adjacent block pairs to merge (default: one per six blocks, at least 1)",
                               metavar="K")
    mrecg_alpha: float = knob(1.6, "MRECG ModCap: weight of a stride-2 layer's parameters")
    mrecg_probe_iters: int | None = knob(None, "mrecg-loss: iterations per block of the probe reconstruction whose "
                                               "losses rank the pairs (default iters / 10, at least 20)")
    mrecg_loss: str = knob("absolute", "mrecg-loss: rank by each block's probe loss (absolute) or by that loss over "
                                       "the energy of the block's float output (relative)")
    mrecg_probe_samples: int = knob(256, "mrecg-loss: the probe reconstructs on the first N calibration samples",
                                    metavar="N")
    weight_quantizer: str = knob("adaround", "quantizer family the weights learn in reconstruction")
    act_quantizer: str = knob("uniform", "quantizer family the activations learn in reconstruction (when --qdrop < 1)")
    qdrop: float = knob(1.0, "probability that an activation stays float in reconstruction (QDrop; 1: BRECQ-style "
                             "float activations, calibrated after)")
    iters: int = knob(20000, "reconstruction iterations per unit; the log estimates the run's time after a few")
    batch_size: int = knob(32, "reconstruction mini-batch")
    micro_batch: int = knob(64, "rows per forward and backward pass: a larger --batch-size accumulates its gradient "
                                "over micro-batches, so memory does not bound the batch", metavar="N")
    w_lr: float | None = knob(None, "weight-rounding learning rate (default 1e-2 up to 2000 iterations, then "
                                    "1e-2 x 2000 / iters)")
    w_lr_decay: bool = knob(False, "the weight family's --w-lr follows a cosine to 0 over each unit's iterations "
                                   "(AdaRound's alpha, FlexRound's divisors, Mr.BiQ's codes; constant when off)")
    a_lr: float | None = knob(None, "activation step learning rate (default 4e-5, scaled like --w-lr)")
    reg_weight: float = knob(0.01, "weight of the rounding regulariser")
    reg_relative: float = knob(0.0, "scale each unit's rounding regulariser to the unit: weight R x (its loss before "
                                    "training) / (its rounding choices), so the regulariser at its largest is R times "
                                    "that loss (0: the fixed --reg-weight)", metavar="R")
    w_step_lr: float = knob(0.0, "also learn the weight steps, Adam lr relative to each step (0: fixed); FlexRound: "
                                 "the rate of its shared divisors s1, s3, s4 (0: --w-lr, as S2)")
    bias_correct: bool = knob(False, "before and after training each unit, move each layer's bias by the per-channel "
                                     "mean its quantized output is off from the float one")
    holdout: int = knob(0, "keep the last N calibration samples out of training and report each unit's loss on them",
                        metavar="N")
    cache_mb: int = knob(4096, "memory for reconstruction caches; beyond it they spill to files in the work directory",
                         result=False)

    def __post_init__(self) -> None:
        _choice("granularity", self.granularity, GRANULARITIES)
        _choice("mrecg_loss", self.mrecg_loss, MRECG_LOSSES)
        if not 0.0 <= self.qdrop <= 1.0:
            raise ConfigError(f"qdrop probability {self.qdrop} must lie in [0, 1]")
        for name, lr in (("w_lr", self.w_lr), ("a_lr", self.a_lr)):
            if lr is not None and not lr > 0:
                raise ConfigError(f"{name}={lr} must be positive")
        if self.reg_weight < 0 or self.reg_relative < 0:
            raise ConfigError(f"reg_weight ({self.reg_weight}) and reg_relative ({self.reg_relative}) must be >= 0")
        if self.holdout < 0:
            raise ConfigError(f"holdout={self.holdout} must be >= 0")
        if self.iters < 0 or self.batch_size < 1 or self.micro_batch < 1:
            raise ConfigError(f"iters ({self.iters}) must be >= 0, batch size ({self.batch_size}) and micro-batch "
                              f"({self.micro_batch}) >= 1")
        if self.mrecg_k is not None and self.mrecg_k < 0:
            raise ConfigError(f"mrecg_k={self.mrecg_k} must be >= 0")
        if not self.mrecg_alpha > 0 or self.mrecg_probe_samples < 1 or (self.mrecg_probe_iters or 1) < 1:
            raise ConfigError("mrecg_alpha must be positive, mrecg_probe_samples and mrecg_probe_iters >= 1")

    def mrecg_pairs(self, blocks: int) -> int:
        """MRECG's k for ``blocks`` blocks: ``mrecg_k``, or one pair per six blocks and at least one;
        never more than the blocks - 1 adjacent pairs there are."""
        k = self.mrecg_k if self.mrecg_k is not None else max(1, round(blocks / 6))
        return min(k, max(blocks - 1, 0))

    def probe_iters(self) -> int:
        """Iterations per block of mrecg-loss's probe: ``mrecg_probe_iters``, or iters / 10 and at least 20."""
        return self.mrecg_probe_iters if self.mrecg_probe_iters is not None else max(20, self.iters // 10)

    def _lr_scale(self) -> float:
        return min(1.0, LR_ITERS / max(self.iters, 1))

    def weight_lr(self) -> float:
        """The weight rounding's Adam learning rate: ``w_lr``, or 1e-2 scaled by 2000 / iters beyond 2000."""
        return self.w_lr if self.w_lr is not None else W_LR * self._lr_scale()

    def act_lr(self) -> float:
        """The activation steps' Adam learning rate: ``a_lr``, or 4e-5 scaled as :meth:`weight_lr`."""
        return self.a_lr if self.a_lr is not None else A_LR * self._lr_scale()


@dataclass
class TargetOptions:
    """How the target lowers and checks the model. The check runs on ``verify_samples`` inputs
    calibration never saw and needs at least ``min_agreement`` top-1 agreement (classifier outputs)
    and, on every sample, ``||ort - fake_quant|| / ||fake_quant|| <= max_error`` (0: bit for bit)."""

    reduce_range: bool = knob(True, "weights of at most 7 bits, exact on CPUs without VNNI (--no-reduce-range: 8-bit "
                                    "weights, exact only with VNNI)", aliases=(("--full-range-weights", False),))
    verify_samples: int = knob(256, "samples the ORT check runs on: the model file's verification_data(), else the "
                                    "last N calibration samples (at most a quarter), held out of calibration",
                               metavar="N", result=False)
    min_agreement: float = knob(0.99, "least ORT vs fake-quant top-1 agreement the check accepts, in (0, 1]",
                                result=False)
    max_error: float = knob(0.01, "largest relative error ||ORT - fake-quant|| / ||fake-quant|| the check accepts on "
                                  "any one sample, in [0, 1) (0 demands equal outputs)", result=False)

    def __post_init__(self) -> None:
        if not isinstance(self.verify_samples, int) or self.verify_samples < 1:
            raise ConfigError(f"verify_samples={self.verify_samples!r} must be a positive integer: the lowered "
                              "model is always checked")
        if not 0.0 < self.min_agreement <= 1.0:
            raise ConfigError(f"min_agreement={self.min_agreement!r} must lie in (0, 1]: 0 would pass any model")
        if not 0.0 <= self.max_error < 1.0:
            raise ConfigError(f"max_error={self.max_error!r} must lie in [0, 1): a relative error of 1 or more "
                              "would pass outputs that have nothing to do with the fake-quant model's")


STAGES = {"quant": QuantConfig, "recon": ReconConfig, "target_options": TargetOptions}


@dataclass
class CompileConfig:
    """The resolved configuration of one compile: method, target and the three stage configs."""

    method: str = knob("rtn", "rtn (round to nearest) or a reconstruction method; see qcompiler.methods")
    target: str = knob("onnx-int8", "deployment target: onnx-int8 (ONNX QDQ run by ONNX Runtime's integer "
                                     "kernels) or onnx-fp (the same quantization simulated in float ops)")
    quant: QuantConfig = field(default_factory=QuantConfig)
    recon: ReconConfig = field(default_factory=ReconConfig)
    target_options: TargetOptions = field(default_factory=TargetOptions)

    def __post_init__(self) -> None:
        from qcompiler.methods import METHODS

        _choice("method", self.method, METHODS)

    def flat(self) -> dict[str, Any]:
        """Every knob's value by its recipe key."""
        return {name: getattr(self._owner(stage), name) for name, (stage, _) in knobs().items()}

    def fingerprint(self) -> dict[str, Any]:
        """The knobs that can change the compiled model (``result=True``)."""
        return {k: v for k, v in self.flat().items() if knobs()[k][1].metadata["result"]}

    def _owner(self, stage: str | None) -> Any:
        return self if stage is None else getattr(self, stage)


def knobs() -> dict[str, tuple[str | None, Any]]:
    """Recipe key -> (stage attribute of CompileConfig or None for the top level, dataclass Field)."""
    out: dict[str, tuple[str | None, Any]] = {}
    for stage, cls in ((None, CompileConfig), *STAGES.items()):
        for f in fields(cls):
            if "help" in f.metadata:
                if f.name in out:
                    raise AssertionError(f"knob {f.name} defined twice")
                out[f.name] = (stage, f)
    return out


def knob_type(f: Any) -> tuple[type, bool]:
    """(base type, optional) of a knob field."""
    owner = next(cls for cls in (CompileConfig, *STAGES.values()) if f in fields(cls))
    tp = typing.get_type_hints(owner)[f.name]
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (dict, list):
        return typing.get_origin(tp), False
    if args and len(args) < len(typing.get_args(tp)):
        return args[0], True
    return tp, False


def default_of(f: Any) -> Any:
    return f.default_factory() if f.default is MISSING else f.default


def _coerce(key: str, value: Any, f: Any, where: str) -> Any:
    tp, optional = knob_type(f)
    if value is None and optional:
        return None
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is dict and isinstance(value, dict) and all(isinstance(v, str) for v in value.values()):
        return {str(k): v for k, v in value.items()}
    if tp is list and isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    if isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{where}: {key} = {value!r} is not a {tp.__name__}")


def resolve(given: dict[str, Any] | None = None, recipe: dict[str, Any] | None = None,
            where: str = "option") -> CompileConfig:
    """The configuration from field defaults < the method's recipe entry < ``recipe`` < ``given``.

    Keys are knob names (dashes read as underscores); an unknown key is an error that names the
    closest known one.
    """
    from qcompiler.methods import METHODS

    table = knobs()
    layers = [(where, _keys(given or {})), ("recipe", _keys(recipe or {}))]
    for source, values in layers:
        for k in values:
            if k not in table:
                near = difflib.get_close_matches(k, table, n=1)
                hint = f" (did you mean {near[0]}?)" if near else ""
                raise ConfigError(f"unknown {source} key {k!r}{hint}; known: {', '.join(sorted(table))}")
    method = layers[0][1].get("method", layers[1][1].get("method", default_of(table["method"][1])))
    if not isinstance(method, str):
        raise ConfigError(f"method = {method!r} is not a str")
    _choice("method", method, METHODS)
    values: dict[str, Any] = {}
    for source, layer in (("method " + method, dict(METHODS[method].defaults)), *reversed(layers)):
        for k, v in layer.items():
            values[k] = _coerce(k, v, table[k][1], source)
    parts: dict[str | None, dict[str, Any]] = {None: {}, **{s: {} for s in STAGES}}
    for k, v in values.items():
        parts[table[k][0]][k] = v
    return CompileConfig(**parts[None], **{s: cls(**parts[s]) for s, cls in STAGES.items()})


def _keys(d: dict[str, Any]) -> dict[str, Any]:
    return {str(k).replace("-", "_"): v for k, v in d.items()}


def parse_pairs(items: list[str], what: str) -> dict[str, str]:
    """``["k=v", ...]`` to a dict; a clear error for an item without '='."""
    out: dict[str, str] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--{what} {item!r} is not KEY=VALUE")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out
