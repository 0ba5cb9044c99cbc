"""Reconstruction (work in progress for the reconstruction issue): loss goes down, runs resume exactly."""

from __future__ import annotations

import copy

import pytest
import torch

import qcompiler
from qcompiler.passes.reconstruct.qdrop import MaskPool
from qcompiler.quantizers.uniform import QSpec, UniformQuantizer

from conftest import MODELS, assert_ort_equals_fake_quant

FAST = {"bits": "w4a4", "method": "qdrop", "iters": 30, "model_args": {"num": 128}}


def test_qdrop_lowers_unit_losses_and_still_deploys(tmp_path):
    r = qcompiler.compile(str(MODELS / "resnet_cifar.py"), report_dir=tmp_path, **FAST)
    units = r.report["reconstruction"]["units"]
    assert len(units) == 11  # stem, 9 residual blocks, head
    improved = sum(u["loss_after"] < u["loss_before"] for u in units)
    assert improved >= 9, units
    assert r.checks["integer_kernels"]["ok"]
    assert_ort_equals_fake_quant(r, (torch.randn(32, 3, 32, 32),))
    assert (tmp_path / "reconstruction_loss.png").stat().st_size > 1000


def test_units_report_how_far_the_rounding_converged(caplog):
    """Each unit records the fraction of its roundings left undecided (h between 0.1 and 0.9) and its
    loss with the soft rounding; a schedule too short to decide them warns."""
    from qcompiler.passes.reconstruct.units import quantizers_of, unit_module
    from qcompiler.quantizers.adaround import rectified_sigmoid

    with caplog.at_level("WARNING", logger="qcompiler"):
        r = qcompiler.compile(str(MODELS / "resnet_cifar.py"), stop_after="reconstruct", **{**FAST, "iters": 20})
    gm, units = r.program.gm, r.program.units
    records = r.report["reconstruction"]["units"]
    for unit, rec in zip(units, records, strict=True):
        if "trained_loss" in rec:
            continue  # the unit went back to its start (its alpha too)
        # hardening leaves alpha alone, so the final quantizers give back the recorded fraction
        wqs = quantizers_of(gm, unit_module(gm, unit, []), "weight")
        h = torch.cat([rectified_sigmoid(q.alpha).flatten() for q in wqs])
        assert rec["undecided"] == pytest.approx(float(((h > 0.1) & (h < 0.9)).double().mean()), abs=1e-4)
        assert rec["loss_soft"] > 0
    assert max(rec["undecided"] for rec in records) > 0.05
    assert any("roundings undecided" in m and "did not converge in 20 iterations" in m for m in caplog.messages)


def test_a_unit_that_training_made_worse_keeps_its_start(monkeypatch):
    """Training that ends above a unit's loss before it is undone: the unit reports the loss it
    trained to and ends at the loss it started from, and the model still deploys."""
    from qcompiler.passes import reconstruct
    from qcompiler.passes.reconstruct.units import quantizers_of

    real = reconstruct.train_unit

    def spoiled(recon, seed, gm, sub, *args, **kwargs):  # noqa: ANN001, ANN202
        conv = real(recon, seed, gm, sub, *args, **kwargs)
        for q in quantizers_of(gm, sub, "weight"):
            q.alpha.data = torch.where(q.alpha >= 0, -1.0, 1.0)  # every rounding the other way
        return conv

    monkeypatch.setattr(reconstruct, "train_unit", spoiled)
    r = qcompiler.compile(str(MODELS / "resnet_cifar.py"), **{**FAST, "iters": 20})
    units = r.report["reconstruction"]["units"]
    assert all(u["trained_loss"] > u["loss_before"] for u in units), units
    assert all(u["loss_after"] == pytest.approx(u["loss_before"], rel=1e-6) for u in units), units
    assert r.checks["integer_kernels"]["ok"]


def test_relative_regulariser_is_r_times_each_units_loss_per_choice():
    """With --reg-relative R a unit's regulariser weight is R x its loss before training / its
    roundings, and a larger R decides more roundings in the same iterations."""
    from qcompiler.passes.reconstruct.units import quantizers_of, unit_module

    undecided = {}
    for rel in (1e-3, 1e3):
        r = qcompiler.compile(str(MODELS / "resnet_cifar.py"), stop_after="reconstruct", reg_relative=rel, w_lr=1.0,
                              **FAST)
        records = r.report["reconstruction"]["units"]
        for unit, rec in zip(r.program.units, records, strict=True):
            choices = sum(q.alpha.numel() for q in quantizers_of(r.program.gm, unit_module(r.program.gm, unit, []),
                                                                 "weight"))
            assert rec["reg_weight"] == pytest.approx(rel * rec["loss_before"] / choices, rel=1e-6)
        undecided[rel] = sum(rec["undecided"] for rec in records) / len(records)
    assert undecided[1e3] < 0.2 * undecided[1e-3], undecided


class _Killed(Exception):
    pass


@pytest.mark.parametrize("extra", [{}, {"bias_correct": True}], ids=["rounding-steps", "corrected-biases"])
def test_interrupted_run_resumes_to_identical_parameters(tmp_path, monkeypatch, extra):
    opts = {**FAST, **extra}
    ref = qcompiler.compile(str(MODELS / "resnet_cifar.py"), stop_after="reconstruct", **opts)
    ref_state = ref.program.gm.state_dict()

    from qcompiler.passes.reconstruct import checkpoint

    real = checkpoint.save
    calls = {"n": 0}

    def dying_save(*args):
        real(*args)
        calls["n"] += 1
        if calls["n"] == 4:
            raise _Killed  # as if killed right after the 4th unit's checkpoint

    monkeypatch.setattr(checkpoint, "save", dying_save)
    with pytest.raises(_Killed):
        qcompiler.compile(str(MODELS / "resnet_cifar.py"), stop_after="reconstruct", work_dir=str(tmp_path), **opts)
    monkeypatch.setattr(checkpoint, "save", real)
    resumed = qcompiler.compile(str(MODELS / "resnet_cifar.py"), stop_after="reconstruct", work_dir=str(tmp_path),
                                **opts)
    assert resumed.report["passes"][-1]["resumed_after"] == 4
    state = resumed.program.gm.state_dict()
    assert state.keys() == ref_state.keys()
    for k in state:  # learned rounding, steps, bias shifts; everything else unchanged
        assert torch.equal(state[k], ref_state[k]), k
    if extra:
        assert sum(bool(v.any()) for k, v in state.items() if k.endswith(".shift")) >= 15


@pytest.mark.parametrize("change", ["weights", "setting"])
def test_a_checkpoint_of_other_weights_or_settings_is_not_resumed(tmp_path, caplog, change):
    """The checkpoint's signature covers the program's tensors and every result-changing knob: a
    rerun with other weights (same shapes) or another setting starts over and says so; the same
    run resumes (the control that proves the check can pass)."""
    torch.manual_seed(0)
    model = _Chain().eval()
    calib = [(torch.randn(16, 3, 8, 8) + 0.5,) for _ in range(2)]
    opts = {"bits": "w4a4", "method": "qdrop", "iters": 3, "stop_after": "reconstruct", "work_dir": str(tmp_path)}

    def run(m, **extra):
        return qcompiler.compile(m, example_inputs=calib[0], calib=calib, **{**opts, **extra})

    first = run(model)
    units = first.report["reconstruction"]["units"]
    assert run(model).report["reconstruction"]["resumed_after"] == len(units)
    if change == "weights":
        other = copy.deepcopy(model)
        with torch.no_grad():
            next(other.parameters()).mul_(1.01)
        again = run(other)
    else:
        again = run(model, reg_weight=0.02)
    assert again.report["reconstruction"]["resumed_after"] == 0
    assert "not resuming" in caplog.text and "starts over" in caplog.text


def test_qdrop_probability_one_feeds_float_and_zero_feeds_quantized():
    q = UniformQuantizer(QSpec(4, False, False))
    q.set_range(torch.tensor(0.0), torch.tensor(1.0))
    q.mode = "quant"
    x = torch.rand(1000) * 1.5
    xq = q(x)
    q.drop_prob = 1.0
    assert torch.equal(q(x), x)
    q.drop_prob = 0.5
    q.drop_masks = MaskPool(0.5, torch.Generator().manual_seed(0), size=1 << 16)
    mixed = q(x)
    from_float = (mixed == x) & (x != xq)
    from_quant = (mixed == xq) & (x != xq)
    assert torch.all(from_float | from_quant | (x == xq))
    assert 0.4 < from_float.float().sum() / (x != xq).sum() < 0.6


class _Chain(torch.nn.Module):
    """Two MBConv-like blocks without skip (every layer dominates the output) and a residual block."""

    def __init__(self) -> None:
        super().__init__()
        def block(c_in, c_out):
            return torch.nn.Sequential(torch.nn.Conv2d(c_in, 8, 1), torch.nn.ReLU6(),
                                       torch.nn.Conv2d(8, 8, 3, padding=1, groups=8), torch.nn.ReLU6(),
                                       torch.nn.Conv2d(8, c_out, 1))
        self.stem = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.blocks = torch.nn.Sequential(block(4, 6), block(6, 6))
        self.res = block(6, 6)
        self.fc = torch.nn.Linear(6, 5)

    def forward(self, x):
        x = self.blocks(torch.relu(self.stem(x)))
        x = x + self.res(x)
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("granularity, expected", [
    ("block", [["stem"], ["blocks.0.0", "blocks.0.2", "blocks.0.4"], ["blocks.1.0", "blocks.1.2", "blocks.1.4"],
               ["res.0", "res.2", "res.4"], ["fc"]]),
    ("layer", [[x] for x in ["stem", "blocks.0.0", "blocks.0.2", "blocks.0.4", "blocks.1.0", "blocks.1.2",
                             "blocks.1.4", "res.0", "res.2", "res.4", "fc"]]),
])
def test_partition_keeps_chained_blocks_whole(granularity, expected):
    torch.manual_seed(0)
    calib = [(torch.randn(4, 3, 8, 8),) for _ in range(2)]
    r = qcompiler.compile(_Chain().eval(), example_inputs=calib[0], calib=calib, bits="w4a4", method="qdrop",
                          granularity=granularity, stop_after="partition")
    assert [u.layers for u in r.program.units] == expected


def test_bias_correction_matches_each_layers_channel_means():
    """After the correction every layer of a unit has, per channel, the float layer's mean output
    over the calibration set, the layers before it corrected first (their shifts pass ReLU6); the
    float layers keep their biases."""
    from qcompiler.ir import registry
    from qcompiler.passes.reconstruct.bias_correction import channel_means, correct_biases
    from qcompiler.passes.reconstruct.units import bias_quantizer_of, forward, unit_module

    torch.manual_seed(0)
    calib = [(torch.randn(16, 3, 8, 8) + 0.5,) for _ in range(2)]
    r = qcompiler.compile(_Chain().eval(), example_inputs=calib[0], calib=calib, bits="w2a4", method="qdrop",
                          stop_after="partition")
    gm, unit = r.program.gm, r.program.units[1]  # blocks.0: conv 1x1, depthwise 3x3, conv 1x1
    nodes = {n.name: n for n in gm.graph.nodes}
    stem = unit_module(gm, r.program.units[0], [])
    x = torch.cat([b[0] for b in calib])
    fp_in, q_in = forward(gm, stem, [x], quant=False), forward(gm, stem, [x], quant=True)
    layers = [n for n in unit.nodes if registry.kind(nodes[n], gm) == "conv"]
    sub = unit_module(gm, unit, layers)
    f_means = channel_means(gm, sub, fp_in, False, [1, 1, 1])
    shift = [q - f for q, f in zip(channel_means(gm, sub, q_in, True, [1, 1, 1]), f_means, strict=True)]
    assert all(float(d.abs().max()) > 1e-3 for d in shift)  # 2-bit weights do shift the means
    correct_biases(gm, unit, fp_in, q_in)
    bqs = [bias_quantizer_of(nodes[n], gm) for n in layers]
    # the first layer's correction is exactly its shift (later layers' also count the earlier corrections)
    torch.testing.assert_close(bqs[0].shift, -shift[0].float())
    for bq, q, f in zip(bqs, channel_means(gm, sub, q_in, True, [1, 1, 1]), f_means, strict=True):
        # what is left is the rounding of the bias to the int32 grid (step s_act * s_w), before
        # (counted in the measured shift) and after the correction: at most one step
        step = bq.step().detach().double()
        assert torch.all((q - f).abs() <= step + 1e-6), (q - f, step)
    for f, f_now in zip(f_means, channel_means(gm, sub, fp_in, False, [1, 1, 1]), strict=True):
        assert torch.equal(f, f_now)


def test_holdout_rows_are_measured_not_trained_on(monkeypatch):
    from qcompiler.errors import QCompileError
    from qcompiler.passes.reconstruct import trainer

    drawn = []
    real = trainer.take_rows

    def recording_take_rows(x, idx):
        drawn.append(int(idx.max()))
        return real(x, idx)

    monkeypatch.setattr(trainer, "take_rows", recording_take_rows)
    opts = {**FAST, "iters": 10, "holdout": 48}
    r = qcompiler.compile(str(MODELS / "resnet_cifar.py"), stop_after="reconstruct", **opts)
    assert drawn and max(drawn) < 128 - 48
    units = r.report["reconstruction"]["units"]
    assert all(u["heldout_before"] > 0 and u["heldout_after"] > 0 for u in units)
    assert len({round(u["heldout_after"], 6) for u in units} - {round(u["loss_after"], 6) for u in units}) == len(units)
    with pytest.raises(QCompileError, match="holdout=128 leaves none"):
        qcompiler.compile(str(MODELS / "resnet_cifar.py"), stop_after="reconstruct", **{**opts, "holdout": 128})


def test_spilled_caches_give_identical_parameters(tmp_path, monkeypatch):
    """With a zero memory budget every cached value lives in a memory-mapped file: same result."""
    import numpy as np

    from qcompiler.passes.reconstruct import cache

    spilled = []
    real_memmap = np.memmap

    def counting_memmap(path, *args, **kwargs):
        spilled.append(path)
        return real_memmap(path, *args, **kwargs)

    monkeypatch.setattr(cache.np, "memmap", counting_memmap)
    opts = {**FAST, "iters": 5}
    runs = []
    for cache_mb, work in ((4096, None), (0, str(tmp_path))):
        r = qcompiler.compile(str(MODELS / "resnet_cifar.py"), stop_after="reconstruct", cache_mb=cache_mb,
                              work_dir=work, **opts)
        runs.append({k: v for k, v in r.program.gm.state_dict().items() if k.startswith("qc_")})
    assert runs[0].keys() == runs[1].keys()
    for k in runs[0]:
        assert torch.equal(runs[0][k], runs[1][k]), k
    assert len(spilled) >= 2 * 11 and all(str(p).startswith(str(tmp_path)) for p in spilled)
    assert not list((tmp_path / "cache").glob("*.bin"))  # spilled files are removed afterwards


def test_float_activation_methods_calibrate_activations_after_reconstruction():
    r = qcompiler.compile(str(MODELS / "resnet_cifar.py"), **{**FAST, "method": "brecq", "iters": 5})
    names = [p["pass"] for p in r.report["passes"]]
    assert names.index("recalibrate") == names.index("reconstruct") + 1
    assert r.report["reconstruction"]["qdrop"] == 1.0
    assert (r.report["reconstruction"]["w_lr"], r.report["reconstruction"]["a_lr"]) == (1e-2, 4e-5)  # the rates used
    assert r.checks["integer_kernels"]["ok"]
    assert_ort_equals_fake_quant(r, (torch.randn(32, 3, 32, 32),))


def test_activation_cache_counts_a_shared_tensor_once(tmp_path):
    from qcompiler.passes.reconstruct.cache import ActivationCache

    t = torch.zeros(256)  # 1 KiB
    cache = ActivationCache(budget_bytes=1024, directory=str(tmp_path))
    cache.put("fp:x", t)
    assert cache.put("q:x", t) is t and cache.used == 1024  # the same tensor twice: in memory, counted once
    cache.drop("fp:x")
    assert cache.used == 1024  # still held by q:x
    cache.drop("q:x")
    assert cache.used == 0
    spilled = cache.put("fp:y", torch.ones(512))  # over budget: memory-mapped
    assert cache.files and torch.equal(spilled, torch.ones(512))
    nhwc = torch.randn(2, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    back = cache.put("fp:z", nhwc)  # a spilled value keeps its memory layout (and so its numerics)
    assert "fp:z" in cache.files and torch.equal(back, nhwc) and back.stride() == nhwc.stride()
    cache.close()
    assert not list(tmp_path.rglob("*.bin"))
