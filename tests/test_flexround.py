"""FlexRound: exact round-to-nearest at initialisation, its straight-through gradients, and its lowering."""

from __future__ import annotations

import pytest
import torch

import qcompiler
from qcompiler.config import ReconConfig
from qcompiler.quantizers.flexround import FlexRoundQuantizer
from qcompiler.quantizers.grid import QSpec
from qcompiler.quantizers.uniform import UniformQuantizer


def _calibrated(spec: QSpec, seed: int = 0) -> tuple[UniformQuantizer, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(8, 4, 3, 3, generator=gen) * 0.2 + 0.03
    q = UniformQuantizer(spec, 8 if spec.axis is not None else None)
    q.init_from_tensor(w, "mse")
    q.mode = "quant"
    return q, w


SPECS = {"affine": QSpec(4, signed=True, symmetric=False, axis=0),
         "symmetric per tensor": QSpec(3, signed=True, symmetric=True),
         "midrise": QSpec(2, signed=True, symmetric=True, axis=0, midrise=True),
         "centered": QSpec(4, signed=True, symmetric=False, axis=0, centered=True)}


@pytest.mark.parametrize("grid", SPECS)
def test_flexround_starts_exactly_at_round_to_nearest(grid):
    q, w = _calibrated(SPECS[grid])
    fr = FlexRoundQuantizer.from_quantizer(q, w)
    assert torch.equal(fr(w), q(w)) and torch.equal(fr.int_repr(w), q.int_repr(w))
    fr.begin_training(ReconConfig(iters=10))
    assert torch.equal(fr(w), q(w))  # the training forward computes the same values
    fr.harden()
    assert torch.equal(fr(w), q(w)) and torch.equal(fr.int_repr(w), q.int_repr(w))


def test_flexround_gradient_wrt_s2_is_minus_w_over_s2_squared_times_the_output_gradient():
    q, w = _calibrated(SPECS["affine"])
    fr = FlexRoundQuantizer.from_quantizer(q, w)
    fr.begin_training(ReconConfig(iters=10))
    with torch.no_grad():
        fr.log_s2.uniform_(-0.3, 0.3)
    g_out = torch.randn_like(w)
    (fr(w) * g_out).sum().backward()
    s2 = fr.log_s2.exp().detach()
    s1 = fr._s1().detach()[:, None, None, None]
    x = w / (s1 * fr._divisor().detach())
    inside = ((fr(w).detach() / s1 - x).abs() <= 0.5).float()  # levels not clamped
    # d w_hat / d S2 = -w / (S2^2 s3 s4) where the level is not clamped; the log parametrisation adds S2
    expected = -w / s2 ** 2 * g_out * inside * s2
    torch.testing.assert_close(fr.log_s2.grad, expected, rtol=1e-5, atol=1e-7)
    assert inside.mean() < 1.0 and inside.mean() > 0.5  # both kinds of weights occur


def test_flexround_shared_divisors_take_w_step_lr_when_set():
    q, w = _calibrated(SPECS["affine"])
    one = FlexRoundQuantizer.from_quantizer(q, w).begin_training(ReconConfig(iters=10, w_lr=4e-4))
    assert [(g.lr, len(g.params)) for g in one] == [(4e-4, 4)]  # the paper's one rate
    fr = FlexRoundQuantizer.from_quantizer(q, w)
    groups = fr.begin_training(ReconConfig(iters=10, w_lr=1e-3, w_step_lr=1e-4))
    rates = {id(p): g.lr for g in groups for p in g.params}
    assert rates == {id(fr.log_s2): 1e-3, id(fr.log_r1): 1e-4, id(fr.log_s3): 1e-4, id(fr.log_s4): 1e-4}
    assert len({g.key for g in groups}) == 2  # two optimizer groups, not merged into one rate


def test_flexround_recipes_decay_the_rate_to_zero():
    from qcompiler.config import resolve

    for method in ("flexround", "flexround-qdrop"):
        recon = resolve({"method": method}).recon
        assert (recon.w_lr, recon.w_lr_decay) == (1e-3, True)
        assert resolve({"method": method, "w_lr_decay": False}).recon.w_lr_decay is False  # an option overrides it


@pytest.mark.parametrize("decay", [False, True])
def test_flexround_rate_decays_to_zero_only_with_w_lr_decay(decay):
    from qcompiler.passes.reconstruct.trainer import _optimizer

    q, w = _calibrated(SPECS["affine"])
    recon = ReconConfig(iters=10, w_lr=4e-4, w_step_lr=1e-4, w_lr_decay=decay)
    opt, sched = _optimizer(FlexRoundQuantizer.from_quantizer(q, w).begin_training(recon), recon.iters)
    assert [g["lr"] for g in opt.param_groups] == [4e-4, 1e-4]
    for _ in range(recon.iters):
        opt.step()
        if sched is not None:
            sched.step()
    end = [g["lr"] for g in opt.param_groups]
    assert end == ([pytest.approx(0.0, abs=1e-12)] * 2 if decay else [4e-4, 1e-4])


def test_flexround_hardened_lowers_to_the_integers_its_forward_dequantizes():
    q, w = _calibrated(SPECS["affine"])
    fr = FlexRoundQuantizer.from_quantizer(q, w)
    fr.begin_training(ReconConfig(iters=10))
    with torch.no_grad():
        for p in (fr.log_r1, fr.log_s2, fr.log_s3, fr.log_s4):
            p.add_(torch.randn_like(p) * 0.1)
    soft = fr(w).detach()
    fr.harden()
    ints = fr.int_repr(w)
    s, z = fr.scale[:, None, None, None], fr.zero_point[:, None, None, None]
    assert torch.equal(fr(w), (ints - z) * s)
    torch.testing.assert_close(fr(w), soft, rtol=0, atol=1e-6)
    assert not torch.equal(ints, q.int_repr(w))  # the learned grid moved some weights


def test_flexround_qdrop_compiles_and_agrees_with_ort(tiny):
    r = qcompiler.compile(str(tiny), bits="w4a4", method="flexround-qdrop", iters=30)
    assert r.report["config"]["weight_quantizer"] == "flexround"
    assert r.checks["agreement"]["top1_agreement"] >= 0.99
