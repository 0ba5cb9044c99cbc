"""Reconstruction (work in progress for the reconstruction issue): loss goes down, runs resume exactly."""

from __future__ import annotations

import pytest
import torch

import qcompiler
from qcompiler.passes.reconstruct import Reconstruct
from qcompiler.quantizers.uniform import MaskPool, QSpec, UniformQuantizer

from conftest import MODELS

FAST = {"bits": "w4a4", "method": "qdrop", "iters": 30, "model_args": {"num": 128}}


def test_qdrop_lowers_unit_losses_and_still_deploys(tmp_path):
    r = qcompiler.compile(str(MODELS / "resnet_cifar.py"), report_dir=tmp_path, **FAST)
    units = r.report["reconstruction"]["units"]
    assert len(units) == 11  # stem, 9 residual blocks, head
    improved = sum(u["loss_after"] < u["loss_before"] for u in units)
    assert improved >= 9, units
    assert r.checks["integer_kernels"]["ok"] and r.checks["agreement"]["top1_agreement"] >= 0.95
    assert (tmp_path / "reconstruction_loss.png").stat().st_size > 1000


class _Killed(Exception):
    pass


def test_interrupted_run_resumes_to_identical_parameters(tmp_path, monkeypatch):
    ref = qcompiler.compile(str(MODELS / "resnet_cifar.py"), stop_after="reconstruct", **FAST)
    ref_state = {k: v for k, v in ref.program.gm.state_dict().items() if k.startswith("qc_")}

    real = Reconstruct._checkpoint
    calls = {"n": 0}

    def dying_checkpoint(path, gm, done, records, signature):
        real(path, gm, done, records, signature)
        calls["n"] += 1
        if calls["n"] == 4:
            raise _Killed  # as if killed right after the 4th unit's checkpoint

    monkeypatch.setattr(Reconstruct, "_checkpoint", staticmethod(dying_checkpoint))
    with pytest.raises(_Killed):
        qcompiler.compile(str(MODELS / "resnet_cifar.py"), stop_after="reconstruct", work_dir=str(tmp_path), **FAST)
    monkeypatch.setattr(Reconstruct, "_checkpoint", staticmethod(real))
    resumed = qcompiler.compile(str(MODELS / "resnet_cifar.py"), stop_after="reconstruct", work_dir=str(tmp_path),
                                **FAST)
    assert resumed.report["passes"][-1]["resumed_after"] == 4
    state = {k: v for k, v in resumed.program.gm.state_dict().items() if k.startswith("qc_")}
    assert state.keys() == ref_state.keys()
    for k in state:
        assert torch.equal(state[k], ref_state[k]), k


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
    assert [u.layers for u in r.program.artifacts["units"]] == expected


def test_spilled_caches_give_identical_parameters(tmp_path, monkeypatch):
    """With a zero memory budget every cached value lives in a memory-mapped file: same result."""
    import numpy as np

    from qcompiler.passes import reconstruct

    spilled = []
    real_memmap = np.memmap

    def counting_memmap(path, *args, **kwargs):
        spilled.append(path)
        return real_memmap(path, *args, **kwargs)

    monkeypatch.setattr(reconstruct.np, "memmap", counting_memmap)
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
    assert r.checks["integer_kernels"]["ok"] and r.checks["agreement"]["top1_agreement"] >= 0.95


def test_activation_cache_counts_a_shared_tensor_once(tmp_path):
    from qcompiler.passes.reconstruct import ActivationCache

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
