"""Reconstruction units from the graph's structure, and MRECG's merges of adjacent blocks."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import qcompiler
from qcompiler.passes import FoldBatchNorm, InsertQuantizers, Mrecg, Partition, Trace
from qcompiler.passes.mrecg import groups_of, rank_pairs

from conftest import MODELS

UNIT_PASSES = [Trace, FoldBatchNorm, InsertQuantizers, Partition]  # units need no calibration


def units_of(model, **kwargs) -> list[list[str]]:
    r = qcompiler.compile(model, passes=[p() for p in UNIT_PASSES], stop_after="partition", **kwargs)
    return [u.layers for u in r.program.units]


class Attention(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value, self.out = (nn.Linear(d, d) for _ in range(4))

    def split(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        return x.view(b, t, self.heads, d // self.heads).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        bias = torch.zeros(b, 1, t, t)
        bias[:, :, :, 0] = -1.0  # in-place item assignment: symbolic_trace fails, torch.export captures it
        q, k, v = self.split(self.query(x)), self.split(self.key(x)), self.split(self.value(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(d // self.heads) + bias
        return self.out(torch.matmul(scores.softmax(-1), v).transpose(1, 2).reshape(b, t, d))


class Encoder(nn.Module):
    """A post-norm transformer layer with its sublayers as modules, as Hugging Face's BERT has them."""

    def __init__(self, d: int = 32) -> None:
        super().__init__()
        self.attention = Attention(d, 4)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.ffn = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.classifier = nn.Linear(d, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x + self.attention(x))
        h = self.norm2(h + self.ffn(h))
        return self.classifier(h[:, 0])


def test_attention_model_gives_its_attention_and_feed_forward_sublayers():
    torch.manual_seed(0)
    calib = [(torch.randn(8, 6, 32),)]
    units = units_of(Encoder().eval(), example_inputs=(torch.randn(1, 6, 32),), calib=calib, bits="w8a8")
    assert units == [["attention.query", "attention.key", "attention.value", "matmul", "matmul_1", "attention.out"],
                     ["ffn.0", "ffn.2"], ["classifier"]]


@pytest.mark.parametrize("bits, target", [("w4a4", "onnx-int8"), ("w4", "onnx-fp")])
def test_resnet20_gives_stem_nine_residual_blocks_and_head(bits, target):
    # weights only (w4): no activation quantizer marks where a layer ends, the layer outputs do
    units = units_of(str(MODELS / "resnet_cifar.py"), bits=bits, target=target)
    blocks = [[f"layer{s}.{b}.conv1", f"layer{s}.{b}.conv2"] for s in (1, 2, 3) for b in range(3)]
    assert units == [["conv1"], *blocks, ["linear"]]
    layers = units_of(str(MODELS / "resnet_cifar.py"), bits=bits, target=target, granularity="layer")
    assert layers == [[x] for u in units for x in u]


def test_efficientnet_lite0_gives_one_unit_per_mbconv_block_plus_stem_and_head(efficientnet):
    units = units_of(str(MODELS / "efficientnet_lite.py"), bits="w4a4", model_args={"num": 16})
    assert units[0] == ["_conv_stem"] and units[-1] == ["_conv_head", "_fc"]
    assert len(units) == 18
    for i, u in enumerate(units[1:-1]):
        convs = ["_depthwise_conv", "_project_conv"] if i == 0 else ["_expand_conv", "_depthwise_conv",
                                                                      "_project_conv"]
        assert u == [f"_blocks.{i}.{c}" for c in convs]


def test_modcap_of_resnet20_at_w4_matches_the_hand_count():
    """3x3 convs, 4-bit weights; the 8-bit ends are stored at 7 bits (reduce range); a stride-2
    conv's parameters weigh 1.6."""
    r = qcompiler.compile(str(MODELS / "resnet_cifar.py"), bits="w4a4", granularity="mrecg-modcap",
                          passes=[p() for p in UNIT_PASSES] + [Mrecg()], stop_after="mrecg")
    conv = {(16, 16): 9 * 16 * 16, (16, 32): 9 * 16 * 32, (32, 32): 9 * 32 * 32, (32, 64): 9 * 32 * 64,
            (64, 64): 9 * 64 * 64}
    by_hand = [9 * 3 * 16 * 7,
               *[2 * conv[16, 16] * 4] * 3,
               conv[16, 32] * 4 * 1.6 + conv[32, 32] * 4, *[2 * conv[32, 32] * 4] * 2,
               conv[32, 64] * 4 * 1.6 + conv[64, 64] * 4, *[2 * conv[64, 64] * 4] * 2,
               64 * 10 * 7]
    part = r.report["partition"]
    assert part["metric"] == pytest.approx(by_hand)
    # 11 blocks: k = 2; the largest squared differences: layer3.2 | head, then layer2.2 | layer3.0
    assert part["k"] == 2
    assert [m[0].split(":")[1] for m in part["merges"]] == ["layer2.2.conv1", "layer3.2.conv1"]
    assert [len(u.layers) for u in r.program.units] == [1, 2, 2, 2, 2, 2, 4, 2, 3]


def test_pairs_rank_by_squared_difference_pairwise_or_chained():
    m = [1.0, 10.0, 1.0, 2.0, 2.5]
    assert rank_pairs(m, 2, chain=True) == [0, 1]  # 81, 81: the two pairs around block 1 chain
    assert rank_pairs(m, 2, chain=False) == [0, 2]  # block 1 is taken: the next pair apart, (2, 3)
    assert groups_of([0, 1], 5) == [[0, 1, 2], [3], [4]]
    assert groups_of([0, 2], 5) == [[0, 1], [2, 3], [4]]
    assert groups_of([], 3) == [[0], [1], [2]]


def test_mrecg_loss_probe_leaves_the_program_untouched_and_reports_its_merges(tiny):
    base = qcompiler.compile(str(tiny), bits="w4a4", method="qdrop", iters=40, stop_after="partition")
    r = qcompiler.compile(str(tiny), bits="w4a4", method="qdrop", iters=40, granularity="mrecg-loss", mrecg_k=1,
                          mrecg_probe_samples=32, stop_after="mrecg")
    for (name, a), (_, b) in zip(base.program.gm.state_dict().items(), r.program.gm.state_dict().items(),
                                 strict=True):
        assert torch.equal(a, b), name  # the probe trained copies
    part = r.report["partition"]
    assert part["granularity"] == "mrecg-loss" and part["probe"] == {"iters": 20, "samples": 32,
                                                                    "seconds": part["probe"]["seconds"]}
    assert len(part["metric"]) == len(part["blocks"]) == 2 and all(m > 0 for m in part["metric"])
    assert len(part["merges"]) == 1 and len(r.program.units) == 1


def test_relative_mrecg_loss_is_each_probe_loss_over_its_float_output_energy(tiny):
    """A probe on every calibration row sees what a block compile sees: its relative metric is the
    absolute one over each unit's reported output energy, which for the head is the logits'."""
    common = dict(bits="w4a4", method="qdrop", iters=40)
    block = qcompiler.compile(str(tiny), granularity="block", **common)
    energy = [u["output_energy"] for u in block.report["reconstruction"]["units"]]
    with torch.no_grad():
        logits = qcompiler.api.load_model_file(str(tiny)).build()(torch.cat([b[0] for b in block.program.calib]))
    assert energy[-1] == pytest.approx(float(logits.pow(2).sum(1).mean()), rel=1e-4)
    probe = dict(granularity="mrecg-loss", mrecg_k=1, mrecg_probe_samples=128, stop_after="mrecg", **common)
    absolute = qcompiler.compile(str(tiny), **probe).report["partition"]["metric"]
    relative = qcompiler.compile(str(tiny), mrecg_loss="relative", **probe).report["partition"]["metric"]
    assert relative == pytest.approx([a / e for a, e in zip(absolute, energy, strict=True)], rel=1e-5)
    assert relative != pytest.approx(absolute)


def test_micro_batches_accumulate_the_gradient_of_the_whole_batch(tiny):
    """Eight rows at a time give the gradient the 32-row batch gives in one pass."""
    from qcompiler.passes.reconstruct.trainer import backward_batch
    from qcompiler.passes.reconstruct.units import forward, modes, unit_module

    r = qcompiler.compile(str(tiny), bits="w4a4", method="brecq", stop_after="partition")
    gm, unit = r.program.gm, r.program.units[0]
    sub = unit_module(gm, unit, [])
    x = torch.cat([b[0] for b in r.program.calib])[:32]
    with torch.no_grad():
        target = forward(gm, sub, [x], quant=False)[0] + 0.1 * torch.randn(32, 16, 8, 8)
    w = next(p for p in gm.parameters() if p.dim() == 4)
    w.requires_grad_(True)
    idx = torch.arange(32)
    grads, losses = [], []
    with modes(gm, sub, "off"):
        for micro in (32, 8):
            w.grad = None
            losses.append(backward_batch(sub, [x], [x], target, idx, micro, 1.0, None, lambda: (w ** 2).sum() * 1e-3))
            grads.append(w.grad.clone())
    assert float(losses[0]) == pytest.approx(float(losses[1]), rel=1e-5)
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-7)
    assert grads[0].abs().max() > 0


def test_fixed_merges_must_name_adjacent_blocks(tiny):
    from qcompiler.errors import PreconditionError

    with pytest.raises(PreconditionError, match="outside"):
        qcompiler.compile(str(tiny), bits="w4a4", passes=[p() for p in UNIT_PASSES] + [Mrecg(merges=[5])],
                          stop_after="mrecg")


def test_granularity_mrecg_runs_reconstruction_end_to_end(tiny):
    r = qcompiler.compile(str(tiny), bits="w4a4", method="qdrop", iters=20, granularity="mrecg-modcap", mrecg_k=1)
    assert r.report["reconstruction"]["granularity"] == "mrecg-modcap"
    assert len(r.report["reconstruction"]["units"]) == len(r.report["partition"]["blocks"]) - 1


def test_oscillation_is_the_upward_variation_of_the_log_loss():
    from qcompiler.passes.reconstruct import oscillation

    assert oscillation([1.0, 2.0, 4.0]) == pytest.approx(math.log(4.0), abs=1e-4)  # rising only: ln(last/first)
    assert oscillation([1.0, 4.0, 1.0, 4.0]) == pytest.approx(2 * math.log(4.0), abs=1e-4)  # each rise counts
    assert oscillation([4.0, 2.0, 1.0]) == 0.0


def test_cli_reports_the_partition_and_the_loss_curve(tiny, tmp_path):
    import json

    from qcompiler.cli import main

    out, report = tmp_path / "m.onnx", tmp_path / "report"
    code = main([str(tiny), "-o", str(out), "--bits", "w4a4", "--method", "qdrop", "--iters", "20",
                 "--granularity", "mrecg-modcap", "--mrecg-k", "1", "--report", str(report), "-q"])
    assert code == 0 and out.exists()
    rep = json.loads((report / "report.json").read_text())
    part = rep["partition"]
    assert part["granularity"] == "mrecg-modcap" and part["k"] == 1 and len(part["merges"]) == 1
    assert [u["layers"] for u in part["units"]] == [["c1", "c2", "fc"]]
    assert isinstance(rep["reconstruction"]["oscillation"], float)
    assert (report / "reconstruction_loss.png").stat().st_size > 0


def test_block_losses_are_measured_at_the_same_points_whatever_the_units(tiny):
    """Layer units and merged units report the loss at each block output; for block units it is
    each unit's loss after training."""
    runs = {g: qcompiler.compile(str(tiny), bits="w4a4", method="qdrop", iters=20, granularity=g, mrecg_k=1)
            for g in ("layer", "block", "mrecg-modcap")}
    assert [len(r.report["reconstruction"]["units"]) for r in runs.values()] == [3, 2, 1]
    assert {len(r.report["reconstruction"]["block_losses"]) for r in runs.values()} == {2}
    rec = runs["block"].report["reconstruction"]
    assert rec["block_losses"] == pytest.approx([u["loss_after"] for u in rec["units"]], rel=1e-5)
