"""CIFAR-10 ResNets of He et al. (2016), depth 6n+2, with "option A" shortcuts.

The network is the one of "Deep Residual Learning for Image Recognition", section 4.2:
a 3x3 conv-BN-ReLU stem with 16 channels, three stages of ``n`` basic blocks with 16, 32
and 64 channels (the second and third stages start with a stride-2 block), global
average pooling and a ``Linear(64, 10)`` classifier. A downsampling block's shortcut has
no parameters: it subsamples by 2 and zero-pads the new channels ("option A").
ResNet-20, -32, -44 and -56 have n = 3, 5, 7 and 9.

Weights: pretrained CIFAR-10 checkpoints by Yerlan Idelbayev (the
``akamaster/pytorch_resnet_cifar10`` project), BSD 2-clause licence; the notice is kept
in ``models/data/LICENSE.resnet_cifar10``. ResNet-20 is embedded as
``models/data/resnet20_cifar10.th``; other depths are looked up in the shared data
directory (``weights/resnet{depth}_cifar10.th``) or passed with ``weights=PATH``.

Data: the shared data directory is ``$QCOMPILER_DATA`` if set, else ``shared/data``
next to the repository. Calibration defaults to the embedded
``models/data/cifar10_calib1k.npz`` (the first 1,024 images of the shared
``cifar10/calib5k.npz``, CIFAR-10 training images). The compile's ORT check and
``evaluate(split="val")`` (for tuning) use calib5k images 1,024 on. Evaluation uses the shared
``cifar10/test10k.npz`` (the 10,000 test images, decoded from a JPEG copy, hence about
10 points below the published accuracy) when present, else the embedded
``models/data/cifar10_test500.npz`` (the first 50 test images of each class).
Float top-1 on test10k: ResNet-20 81.03%, ResNet-56 83.20%.

A model file is Python code that runs when it is loaded: only load model files you
trust.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ResNetCIFAR", "build", "calibration_data", "evaluate", "example_inputs"]

NUM_CLASSES = 10
IMAGE_SHAPE = (32, 32, 3)
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)

EMBEDDED_DIR = Path(__file__).resolve().parent / "data"
EMBEDDED_WEIGHTS = EMBEDDED_DIR / "resnet20_cifar10.th"
EMBEDDED_CALIB = EMBEDDED_DIR / "cifar10_calib1k.npz"
EMBEDDED_TEST = EMBEDDED_DIR / "cifar10_test500.npz"


# --------------------------------------------------------------------------- model


class PadShortcut(nn.Module):
    """Parameter-free "option A" shortcut: subsample by 2, zero-pad the channels."""

    def __init__(self, planes: int) -> None:
        super().__init__()
        self.pad = planes // 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(
            x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad), "constant", 0.0
        )


class BasicBlock(nn.Module):
    """conv3x3(stride)-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(
            in_planes, planes, 3, stride=stride, padding=1, bias=False
        )
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module
        if stride != 1 or in_planes != planes:
            self.shortcut = PadShortcut(planes)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetCIFAR(nn.Module):
    """He et al. CIFAR ResNet of depth 6n+2 (parameter names match the checkpoints)."""

    def __init__(self, depth: int = 20, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        n = _blocks_per_stage(depth)
        self.depth = depth
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._stage(16, 16, n, stride=1)
        self.layer2 = self._stage(16, 32, n, stride=2)
        self.layer3 = self._stage(32, 64, n, stride=2)
        self.linear = nn.Linear(64, num_classes)

    @staticmethod
    def _stage(in_planes: int, planes: int, n: int, stride: int) -> nn.Sequential:
        blocks = [BasicBlock(in_planes, planes, stride)]
        blocks += [BasicBlock(planes, planes, 1) for _ in range(n - 1)]
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map a normalised NCHW batch (N, 3, 32, 32) to logits (N, 10)."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1)
        return self.linear(torch.flatten(out, 1))


def _blocks_per_stage(depth: int) -> int:
    if depth < 8 or (depth - 2) % 6 != 0:
        raise ValueError(
            "CIFAR ResNet depth must be 6n+2 with n >= 1 (20, 32, 44, 56, ...), "
            f"got {depth}"
        )
    return (depth - 2) // 6


def _shared_data_dir() -> Path:
    """Return ``$QCOMPILER_DATA``, else ``shared/data`` beside the repository."""
    env = os.environ.get("QCOMPILER_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _default_weights(depth: int) -> Path:
    if depth == 20:
        return EMBEDDED_WEIGHTS
    path = _shared_data_dir() / "weights" / f"resnet{depth}_cifar10.th"
    if not path.is_file():
        raise FileNotFoundError(
            f"no pretrained weights for ResNet-{depth}: {path} does not exist; "
            "pass weights=PATH to a checkpoint (a state dict, optionally under "
            "'state_dict')"
        )
    return path


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint (tensors only); return its state dict without ``module.``."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(ckpt, dict) and isinstance(ckpt.get("state_dict"), dict):
        ckpt = ckpt["state_dict"]
    if not isinstance(ckpt, dict):
        raise TypeError(
            f"{path}: expected a state dict (or a dict with 'state_dict'), "
            f"got {type(ckpt).__name__}"
        )
    return {key.removeprefix("module."): value for key, value in ckpt.items()}


def build(
    depth: int | str = 20, weights: str | os.PathLike[str] | None = None
) -> nn.Module:
    """Build a pretrained CIFAR-10 ResNet of the given depth, in eval mode.

    Args:
        depth: 6n+2 (20, 32, 44, 56, ...); a string from the command line is accepted.
        weights: checkpoint path; by default the embedded ResNet-20 weights, or for
            other depths ``weights/resnet{depth}_cifar10.th`` in the shared data
            directory.
    """
    depth = int(depth)
    model = ResNetCIFAR(depth)
    path = Path(weights) if weights is not None else _default_weights(depth)
    model.load_state_dict(_load_state_dict(path), strict=True)
    return model.eval()


def example_inputs() -> tuple[torch.Tensor]:
    """One random input batch of the model's shape."""
    return (torch.randn(1, 3, 32, 32),)


# --------------------------------------------------------------------------- data


def _load_images(
    path: str | os.PathLike[str], need_labels: bool = False
) -> tuple[np.ndarray, np.ndarray | None]:
    """Load ``images`` (uint8 N x 32 x 32 x 3) and, if present, ``labels``."""
    with np.load(path, allow_pickle=False) as npz:
        if "images" not in npz.files:
            raise ValueError(
                f"{path}: expected an .npz with key 'images' "
                "(uint8, N x 32 x 32 x 3 RGB)"
            )
        images = npz["images"]
        labels = npz["labels"] if "labels" in npz.files else None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != IMAGE_SHAPE:
        raise ValueError(
            f"{path}: 'images' must be uint8 N x 32 x 32 x 3 (RGB, NHWC), "
            f"got {images.dtype} {images.shape}"
        )
    if need_labels:
        if labels is None or labels.ndim != 1 or len(labels) != len(images):
            raise ValueError(f"{path}: expected 'labels' (int64, N) matching 'images'")
        labels = labels.astype(np.int64)
    return images, labels


def _preprocess(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC RGB -> float32 NCHW, ``x / 255`` then normalised by MEAN and STD."""
    x = (
        torch.from_numpy(np.ascontiguousarray(images))
        .permute(0, 3, 1, 2)
        .float()
        .div_(255.0)
    )
    mean = torch.tensor(MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(STD, dtype=torch.float32).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous()


def calibration_data(
    calib: str | os.PathLike[str] | None = None,
    num: int | str = 1024,
    batch_size: int | str = 64,
) -> list[tuple[torch.Tensor]]:
    """The first ``num`` calibration images as preprocessed batches ``(x,)``.

    Args:
        calib: an .npz with ``images`` (uint8 N x 32 x 32 x 3); default the embedded
            1,024 CIFAR-10 training images.
        num: how many images to use (at most the number available).
        batch_size: images per batch.
    """
    num, batch_size = int(num), int(batch_size)
    if num < 1 or batch_size < 1:
        raise ValueError(
            "num and batch_size must be positive, "
            f"got num={num}, batch_size={batch_size}"
        )
    images, _ = _load_images(calib if calib is not None else EMBEDDED_CALIB)
    images = images[:num]
    return [
        (_preprocess(images[i : i + batch_size]),)
        for i in range(0, len(images), batch_size)
    ]


def _class_balanced_order(labels: np.ndarray) -> np.ndarray:
    """Indices ordered round-robin over classes (1st of each class, then 2nd, ...).

    The test files are sorted by class, so a prefix of this order is class-balanced,
    where a plain prefix would hold a single class.
    """
    rank = np.empty(len(labels), dtype=np.int64)
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        rank[idx] = np.arange(len(idx))
    return np.lexsort((np.arange(len(labels)), labels, rank))


VAL_START = 1024  # calib5k rows from here on are the validation set (the first 1,024 calibrate)


def _validation_file() -> Path:
    """The shared ``cifar10/calib5k.npz`` (validation rows ``VAL_START:``), or FileNotFoundError."""
    path = _shared_data_dir() / "cifar10" / "calib5k.npz"
    if not path.is_file():
        raise FileNotFoundError(f"validation images not found: {path}; set QCOMPILER_DATA to the shared data directory")
    return path


def verification_data(verify_num: int | str = 256, batch_size: int | str = 64) -> list[tuple[torch.Tensor]] | None:
    """Inputs for the compile's ORT check that calibration never saw: ``verify_num`` validation
    images (``calib5k.npz`` rows 1,024 on). None when the shared data is absent: the compile then
    holds out part of the calibration set instead."""
    try:
        path = _validation_file()
    except FileNotFoundError:
        return None
    images, _ = _load_images(path)
    images = images[VAL_START : VAL_START + int(verify_num)]
    return [(_preprocess(images[i : i + int(batch_size)]),) for i in range(0, len(images), int(batch_size))]


def evaluate(
    run: Callable[[tuple[torch.Tensor]], torch.Tensor],
    limit: int | str | None = None,
    batch_size: int | str = 500,
    split: str = "test",
) -> dict[str, float | int | str]:
    """Top-1 of ``run`` (``(x,)`` -> logits ``(N, 10)``) on CIFAR-10 test or validation images.

    ``split="test"`` (the reported set) uses the shared ``cifar10/test10k.npz`` when present, else
    the embedded 500-image subset; ``split="val"`` (for tuning) the 3,976 shared ``calib5k.npz``
    images after the 1,024 that calibrate. With ``limit``, evaluates a class-balanced subset of that
    many images.

    Returns:
        ``{"top1": percent, "n": images evaluated, "dataset": name}``.
    """
    batch_size = int(batch_size)
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if split == "val":
        images, labels = _load_images(_validation_file(), need_labels=True)
        images, labels, dataset = images[VAL_START:], labels[VAL_START:], "cifar10/calib5k[1024:]"
    elif split == "test":
        full = _shared_data_dir() / "cifar10" / "test10k.npz"
        if full.is_file():
            path, dataset = full, "cifar10/test10k"
        else:
            path, dataset = EMBEDDED_TEST, "embedded test subset"
        images, labels = _load_images(path, need_labels=True)
    else:
        raise ValueError(f"unknown split {split!r}; choose test or val")
    assert labels is not None
    if limit is not None and int(limit) < len(images):
        if int(limit) < 1:
            raise ValueError(f"limit must be positive, got {limit}")
        keep = np.sort(_class_balanced_order(labels)[: int(limit)])
        images, labels = images[keep], labels[keep]

    correct = 0
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            logits = run((_preprocess(images[i : i + batch_size]),))
            batch_labels = torch.from_numpy(labels[i : i + batch_size])
            if logits.ndim != 2 or logits.shape[0] != len(batch_labels):
                raise ValueError(
                    f"run must return logits of shape (N, {NUM_CLASSES}), "
                    f"got {tuple(logits.shape)}"
                )
            correct += int((logits.detach().cpu().argmax(dim=1) == batch_labels).sum())
    n = len(images)
    return {"top1": 100.0 * correct / n, "n": n, "dataset": dataset}
