"""Small Hugging Face architectures as one qcompiler model file: ``--model-arg arch=NAME``.

Each architecture is built from a small ``transformers`` config with random weights (its own
initialiser, seeded; BatchNorm statistics and LayerNorm affine parameters perturbed so no layer is
an identity), so nothing is downloaded. The model returns one tensor: the logits of the image
classifiers, the last hidden state of the text encoders and GPT-2. Inputs: images of
``IMAGE_SIZE`` pixels drawn from a standard normal distribution, or random token ids with an
attention mask whose later positions are padding for some rows.

    qcompile models/hf_zoo.py --model-arg arch=bert --bits w8a8 -o bert.onnx

``--model-arg size=default`` builds the image architectures from their configs' defaults instead
(full-width EfficientNet, MobileViT, ...), still random, on ``DEFAULT_IMAGE_SIZE`` pixels.

This file is Python code: loading it as a model file executes it.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ARCHS", "build", "calibration_data", "example_inputs", "verification_data"]

IMAGE_SIZE = 32
DEFAULT_IMAGE_SIZE = 96
SEQ_LEN = 16
VOCAB = 128
CLASSES = 10


def _configs() -> dict[str, tuple]:
    """arch -> (model class, config, input kind)."""
    import transformers as T

    vision = {"num_channels": 3, "image_size": IMAGE_SIZE, "num_labels": CLASSES}
    text = {"vocab_size": VOCAB, "max_position_embeddings": 64}
    return {
        "resnet": (T.ResNetForImageClassification, T.ResNetConfig(
            embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic", num_labels=CLASSES),
            "image"),
        "mobilenet_v2": (T.MobileNetV2ForImageClassification, T.MobileNetV2Config(
            depth_multiplier=0.35, image_size=IMAGE_SIZE, num_labels=CLASSES), "image"),
        "convnext": (T.ConvNextForImageClassification, T.ConvNextConfig(
            hidden_sizes=[16, 32], depths=[1, 1], num_stages=2, num_labels=CLASSES), "image"),
        "efficientnet": (T.EfficientNetForImageClassification, T.EfficientNetConfig(
            image_size=IMAGE_SIZE, width_coefficient=0.25, depth_coefficient=0.25, hidden_dim=320,
            num_labels=CLASSES), "image"),
        "mobilevit": (T.MobileViTForImageClassification, T.MobileViTConfig(
            image_size=IMAGE_SIZE, hidden_sizes=[16, 24, 32], neck_hidden_sizes=[8, 8, 16, 16, 24, 24, 48],
            num_attention_heads=2, num_labels=CLASSES), "image"),
        "vit": (T.ViTForImageClassification, T.ViTConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=8, **vision),
            "image"),
        "swin": (T.SwinForImageClassification, T.SwinConfig(
            image_size=IMAGE_SIZE, patch_size=2, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=4,
            num_labels=CLASSES), "image"),
        "bert": (T.BertModel, T.BertConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, **text), "text"),
        "distilbert": (T.DistilBertModel, T.DistilBertConfig(
            dim=32, n_layers=2, n_heads=2, hidden_dim=64, **text), "text"),
        "gpt2": (T.GPT2Model, T.GPT2Config(
            n_embd=32, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=64), "text"),
    }


ARCHS = ("resnet", "mobilenet_v2", "convnext", "efficientnet", "mobilevit", "vit", "swin", "bert", "distilbert",
         "gpt2")


class FirstTensor(nn.Module):
    """The wrapped model's logits (classifiers) or last hidden state, as one tensor; takes its
    inputs as varargs, as user wrappers often do."""

    def __init__(self, model: nn.Module, names: tuple[str, ...]) -> None:
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        out = self.model(**dict(zip(self.names, args, strict=True)))
        return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _kind(arch: str) -> str:
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    return "text" if arch in ("bert", "distilbert", "gpt2") else "image"


def _perturb(model: nn.Module, gen: torch.Generator) -> None:
    """Give normalisation layers non-trivial statistics and affine parameters."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.normal_(0.0, 0.1, generator=gen)
                m.running_var.uniform_(0.5, 2.0, generator=gen)
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)) and m.weight is not None:
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.normal_(0.0, 0.1, generator=gen)


def _pixels(size: str) -> int:
    if size not in ("small", "default"):
        raise ValueError(f"size {size!r}: small or default")
    return DEFAULT_IMAGE_SIZE if size == "default" else IMAGE_SIZE


def build(arch: str = "bert", seed: int = 0, size: str = "small") -> nn.Module:
    """The architecture ``arch`` with seeded random weights, in eval mode."""
    _kind(arch)
    cls, config, _ = _configs()[arch]
    if size == "default" and _kind(arch) == "image":
        config = type(config)(image_size=_pixels(size), num_labels=CLASSES)
    torch.manual_seed(int(seed))
    model = cls(config)
    _perturb(model, torch.Generator().manual_seed(int(seed)))
    names = ("input_ids", "attention_mask") if _kind(arch) == "text" else ("pixel_values",)
    return FirstTensor(model, names).eval()


def _batch(arch: str, n: int, gen: torch.Generator, size: str = "small") -> tuple[torch.Tensor, ...]:
    if _kind(arch) == "image":
        return (torch.randn(n, 3, _pixels(size), _pixels(size), generator=gen),)
    ids = torch.randint(1, VOCAB, (n, SEQ_LEN), generator=gen)
    lengths = torch.randint(SEQ_LEN // 2, SEQ_LEN + 1, (n,), generator=gen)
    mask = (torch.arange(SEQ_LEN)[None, :] < lengths[:, None]).long()
    return ids * mask, mask


def example_inputs(arch: str = "bert", size: str = "small") -> tuple[torch.Tensor, ...]:
    return _batch(arch, 2, torch.Generator().manual_seed(1), size)


def calibration_data(arch: str = "bert", samples: int = 64, batch: int = 16, size: str = "small"
                     ) -> list[tuple[torch.Tensor, ...]]:
    """``samples`` random inputs (seeded) in batches of ``batch``."""
    gen = torch.Generator().manual_seed(2)
    return [_batch(arch, batch, gen, size) for _ in range(max(1, int(samples) // int(batch)))]


def verification_data(arch: str = "bert", verify_num: int = 64, size: str = "small") -> list[tuple[torch.Tensor, ...]]:
    """``verify_num`` held-out inputs (another seed than the calibration's), at most 64."""
    gen = torch.Generator().manual_seed(3)
    return [_batch(arch, 16, gen, size) for _ in range(max(1, min(int(verify_num), 64) // 16))]
