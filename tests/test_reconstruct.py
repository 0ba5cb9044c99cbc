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
