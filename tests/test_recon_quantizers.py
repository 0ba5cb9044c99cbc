"""Reconstruction quantizers: AdaRound rounding, its regulariser and schedule, and the LSQ step gradient."""

from __future__ import annotations

import pytest
import torch

from qcompiler.quantizers.adaround import AdaRoundQuantizer, BetaSchedule, rectified_sigmoid
from qcompiler.quantizers.grid import QSpec
from qcompiler.quantizers.ranges import search_range
from qcompiler.quantizers.uniform import UniformQuantizer


def _weight_quantizer(symmetric: bool, method: str = "minmax", seed: int = 0, bits: int = 4, midrise: bool = False
                      ) -> tuple[UniformQuantizer, torch.Tensor]:
    """A calibrated per-channel (axis 0) weight quantizer (4-bit by default) and its conv-shaped weight."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(8, 4, 3, 3, generator=gen) * 0.2 + (0.0 if symmetric else 0.05)
    q = UniformQuantizer(QSpec(bits, signed=True, symmetric=symmetric, axis=0, midrise=midrise), 8)
    q.init_from_tensor(w, method)
    q.mode = "quant"
    return q, w


@pytest.mark.parametrize("method", ["minmax", "mse"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_adaround_init_hardened_is_round_to_nearest(symmetric: bool, method: str) -> None:
    q, w = _weight_quantizer(symmetric, method)
    ada = AdaRoundQuantizer.from_quantizer(q, w)
    assert not ada.soft and ada.mode == "quant"
    assert torch.equal(ada(w), q(w))
    assert torch.equal(ada.int_repr(w), q.int_repr(w))
    ada.soft = True
    ada.harden()
    assert torch.equal(ada(w), q(w))


def test_adaround_init_ties_round_half_to_even() -> None:
    q = UniformQuantizer(QSpec(4, signed=True, symmetric=True, axis=0), 2)
    q.scale.data = torch.tensor([0.25, 0.5])  # powers of two: k + 0.5 steps are exact ties
    q.mode = "quant"
    k = torch.arange(-6, 6, dtype=torch.float32) + 0.5
    w = torch.stack([k * 0.25, k * 0.5])
    ada = AdaRoundQuantizer.from_quantizer(q, w)
    assert torch.equal(ada.int_repr(w), q.int_repr(w))
    assert torch.equal(ada(w), q(w))


def test_adaround_soft_init_is_clamped_weight() -> None:
    q, w = _weight_quantizer(symmetric=False, method="mse")
    ada = AdaRoundQuantizer.from_quantizer(q, w)
    ada.soft = True
    s, z = q.scale[:, None, None, None], q.zero_point[:, None, None, None]
    clamped = torch.minimum(torch.maximum(w, (q.qmin - z) * s), (q.qmax - z) * s)
    torch.testing.assert_close(ada(w), clamped, rtol=0, atol=float(q.scale.max()) * 2e-4)


@pytest.mark.parametrize("symmetric", [True, False])
def test_adaround_hardened_weights_on_grid(symmetric: bool) -> None:
    q, w = _weight_quantizer(symmetric, "mse", seed=1)
    ada = AdaRoundQuantizer.from_quantizer(q, w)
    gen = torch.Generator().manual_seed(2)
    ada.alpha.data += torch.randn(ada.alpha.shape, generator=gen) * 3.0
    ada.soft = True
    ada.harden()
    s, z = q.scale[:, None, None, None], q.zero_point[:, None, None, None]
    ints, out = ada.int_repr(w), ada(w)
    assert torch.equal(ints, torch.round(ints))
    assert bool((ints >= q.qmin).all()) and bool((ints <= q.qmax).all())
    # The forward is the deployed DequantizeLinear of the stored integers, bit for bit ...
    assert torch.equal(out, (ints - z) * s)
    # ... so forward / s + z is those integers (exact after rounding; (k * s) / s may be off by an ulp).
    assert torch.equal(torch.round(out / s) + z, ints)
    torch.testing.assert_close(out / s + z, ints, rtol=0, atol=1e-4)
    # Every weight went down or up: clamp(floor(w / s) + b + z) with b in {0, 1}.
    floor = torch.floor(w / s)
    down = torch.clamp(floor + z, q.qmin, q.qmax)
    up = torch.clamp(floor + 1 + z, q.qmin, q.qmax)
    assert bool(((ints == down) | (ints == up)).all())
    assert bool((ints == down).any()) and bool((ints == up).any())
    assert torch.equal(ints == up, torch.where(ints == down, up == down, ada.alpha >= 0))


def test_adaround_state_dict_round_trip() -> None:
    q, w = _weight_quantizer(symmetric=True)
    ada = AdaRoundQuantizer.from_quantizer(q, w)
    ada.alpha.data = -ada.alpha.data
    loaded = AdaRoundQuantizer(q.spec, 8, tuple(w.shape))
    loaded.load_state_dict(ada.state_dict())
    loaded.mode = "quant"
    assert isinstance(loaded.alpha, torch.nn.Parameter)
    assert torch.equal(loaded.int_repr(w), ada.int_repr(w))
    assert torch.equal(loaded(w), ada(w))


def test_adaround_regularizer_extremes() -> None:
    q, w = _weight_quantizer(symmetric=True)
    ada = AdaRoundQuantizer.from_quantizer(q, w)
    signs = torch.where(torch.rand(w.shape, generator=torch.Generator().manual_seed(3)) < 0.5, -1.0, 1.0)
    ada.alpha.data = signs * 20.0  # h is exactly 0 or 1
    assert torch.equal(rectified_sigmoid(ada.alpha), (signs > 0).float())
    assert float(ada.penalty(20.0)) == 0.0
    assert float(ada.penalty(2.0)) == 0.0
    ada.alpha.data = torch.zeros_like(ada.alpha)  # h = 0.5
    for beta in (2.0, 20.0):
        assert float(ada.penalty(beta)) == pytest.approx(w.numel(), rel=1e-6)
    ada.alpha.data = torch.randn(w.shape) * 0.1
    assert 0.0 < float(ada.penalty(2.0)) < w.numel()


def test_beta_schedule() -> None:
    sched = BetaSchedule(100, warmup=0.2)
    assert all(sched(it) == (20.0, False) for it in range(20))
    assert sched(20) == (20.0, True)
    assert sched(99) == (2.0, True)
    betas = [sched(it)[0] for it in range(20, 100)]
    assert all(a > b for a, b in zip(betas, betas[1:], strict=False))
    assert sched(59)[0] == pytest.approx(20.0 - 18.0 * 39 / 79)
    assert BetaSchedule(10, warmup=0.0)(0) == (20.0, True)


def test_adaround_gradient_reaches_alpha_in_soft_mode() -> None:
    q, w = _weight_quantizer(symmetric=False)
    ada = AdaRoundQuantizer.from_quantizer(q, w)
    ada.alpha.requires_grad_(True)
    ada.soft = True
    loss = (ada(w) - w * 1.1).pow(2).sum() + 0.01 * ada.penalty(10.0)
    loss.backward()
    assert ada.alpha.grad is not None and float(ada.alpha.grad.abs().sum()) > 0
    inner = (rectified_sigmoid(ada.alpha) > 0) & (rectified_sigmoid(ada.alpha) < 1)
    assert bool((ada.alpha.grad[inner] != 0).any())


@pytest.mark.parametrize("grid", ["asymmetric", "symmetric", "midrise"])
def test_adaround_fused_soft_weight_and_regulariser_match_composition(grid: str) -> None:
    """The soft forward (one autograd node that also leaves the regulariser in ``reg``) gives the
    values of the composition of ``rectified_sigmoid``, clamp and ``regularizer`` bit for bit, and
    their gradients, to alpha and to a trained weight step, also where h or the level is clamped."""
    q, w = _weight_quantizer(symmetric=grid != "asymmetric", method="mse", midrise=grid == "midrise")
    ada = AdaRoundQuantizer.from_quantizer(q, w)
    gen = torch.Generator().manual_seed(5)
    ada.alpha.data = ada.alpha.data + torch.randn(w.shape, generator=gen) * 4.0  # h saturates at 0 and 1
    w = w * 1.3  # some levels clamp at qmin / qmax
    upstream = torch.randn(w.shape, generator=gen)
    results = []
    for fused in (True, False):
        ada.alpha.grad, ada.scale.grad = None, None
        ada.alpha.requires_grad_(True)
        ada.scale.requires_grad_(True)
        ada.soft, ada._base = True, None
        if fused:
            ada.reg_beta = 7.0
            out = ada(w)
            reg = ada.reg
        else:
            floor, zi = ada._grid(w)
            out = ada.level_values(torch.clamp(floor + zi + rectified_sigmoid(ada.alpha), q.qmin, q.qmax), w)
            reg = ada.penalty(7.0)
        ((out * upstream).sum() + 0.3 * reg).backward()
        results.append((out.detach(), reg.detach(), ada.alpha.grad.clone(), ada.scale.grad.clone()))
    (o1, r1, ga1, gs1), (o2, r2, ga2, gs2) = results
    assert torch.equal(o1, o2) and torch.equal(r1, r2)
    assert bool((ga2 != 0).any()) and bool((ga2 == 0).any())  # both the passing and the clamped cases
    torch.testing.assert_close(ga1, ga2, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gs1, gs2, rtol=1e-5, atol=1e-6)
    ada.harden()
    assert ada.reg is None and ada.reg_beta is None


@pytest.mark.parametrize("bits", [2, 4])
def test_midrise_grid_is_symmetric_zero_free_and_deploys_exactly(bits: int) -> None:
    gen = torch.Generator().manual_seed(12)
    w = torch.randn(6, 4, 3, 3, generator=gen) * 0.1
    q = UniformQuantizer(QSpec(bits, signed=True, symmetric=True, axis=0, midrise=True), 6)
    q.init_from_tensor(w, "mse")
    q.mode = "quant"
    s = q.scale[:, None, None, None]
    levels = (q(w) / s - 0.5).round()
    torch.testing.assert_close(q(w), (levels + 0.5) * s)
    assert float(levels.min()) >= q.qmin and float(levels.max()) <= q.qmax
    assert not bool((q(w) == 0).any())  # no zero level
    ints = q.int_repr(w)
    assert bool((ints.remainder(2) == 1).all()) and float(ints.abs().max()) <= 2 ** bits - 1
    assert torch.equal(ints * q.stored_scale()[:, None, None, None], q(w))  # what DequantizeLinear computes
    # For a symmetric (Gaussian) weight the zero-free grid has the smaller error at 2 bits.
    if bits == 2:
        z = UniformQuantizer(QSpec(bits, signed=True, symmetric=True, axis=0), 6)
        z.init_from_tensor(w, "mse")
        z.mode = "quant"
        assert float((q(w) - w).pow(2).sum()) < float((z(w) - w).pow(2).sum())


def test_adaround_on_midrise_grid_starts_at_nearest_level_and_deploys_exactly() -> None:
    q, w = _weight_quantizer(symmetric=True, seed=13, bits=3, midrise=True)
    ada = AdaRoundQuantizer.from_quantizer(q, w)
    assert torch.equal(ada(w), q(w))
    assert torch.equal(ada.int_repr(w), q.int_repr(w))
    ada.soft = True
    soft = ada(w)
    assert float((soft - w).abs().max()) <= float(q.scale.max()) * 0.51  # soft start near the weight
    ada.alpha.data = torch.randn(ada.alpha.shape, generator=torch.Generator().manual_seed(15))  # another rounding
    ada.harden()
    ints = ada.int_repr(w)
    assert bool((ints.remainder(2) == 1).all())
    assert torch.equal(ints * ada.stored_scale()[:, None, None, None], ada(w))


@pytest.mark.parametrize("midrise", [False, True])
def test_adaround_learned_step_keeps_integers_and_deploys_exactly(midrise: bool) -> None:
    """Training ``scale`` rescales the weights; the integers stay those placed by ``grid_scale``."""
    q, w = _weight_quantizer(symmetric=True, method="mse", seed=14, bits=2, midrise=midrise)
    ada = AdaRoundQuantizer.from_quantizer(q, w)
    ints = ada.int_repr(w)
    ada.scale.data = ada.scale.data * torch.linspace(0.7, 1.3, 8)  # as a trained step would move
    assert torch.equal(ada.int_repr(w), ints)
    stored = ada.stored_scale()[:, None, None, None]
    assert torch.equal(ada.int_repr(w) * stored, ada(w))
    assert not torch.equal(ada(w), q(w))


@pytest.mark.parametrize("halves", [False, True])
@pytest.mark.parametrize("bits", [2, 4])
def test_centered_asymmetric_grid_deploys_with_zero_zero_point(bits: int, halves: bool) -> None:
    """Per-channel asymmetric weights stored as ``k - z``: zero point 0, exact, one (two) bits wider."""
    gen = torch.Generator().manual_seed(16)
    w = torch.randn(6, 4, 3, 3, generator=gen) * 0.1 + torch.linspace(-0.08, 0.08, 6)[:, None, None, None]
    q = UniformQuantizer(QSpec(bits, signed=True, symmetric=False, axis=0, centered=True, zp_halves=halves), 6)
    q.init_from_tensor(w, "mse")
    q.mode = "quant"
    z = q.zero_point
    assert torch.equal(z, (2 * z).round() / 2 if halves else z.round())
    assert bool((z >= q.qmin).all()) and bool((z <= q.qmax).all())
    assert len(set(z.tolist())) > 1  # skewed channels choose different zero points
    if halves:  # the near-symmetric middle channels take the zero-free (midrise) grid
        assert bool((z != z.round()).any())
    ints = q.int_repr(w)
    assert torch.equal(ints, ints.round()) and float(ints.abs().max()) <= (2 ** bits - 1) * (2 if halves else 1)
    assert torch.equal(q.stored_zero_point(), torch.zeros(6))
    assert torch.equal(ints * q.stored_scale()[:, None, None, None], q(w))  # what DequantizeLinear computes
    ada = AdaRoundQuantizer.from_quantizer(q, w)
    assert torch.equal(ada.int_repr(w), ints)
    ada.alpha.data = torch.randn(ada.alpha.shape, generator=torch.Generator().manual_seed(17))
    assert torch.equal(ada.int_repr(w) * ada.stored_scale()[:, None, None, None], ada(w))
    # The joint (width, zero point) search is at least as good as shrinking [min, max] over the layer.
    r = UniformQuantizer(QSpec(bits, signed=True, symmetric=False, axis=0, centered=True), 6)
    lo, hi = search_range(w.reshape(6, -1), r.spec, p=2.4)
    r.set_range(lo, hi)
    r.mode = "quant"
    err = lambda m: (m(w) - w).abs().pow(2.4).reshape(6, -1).mean(1)  # noqa: E731
    assert float(err(q).sum()) <= float(err(r).sum())


def test_take_rows_equals_indexing_in_the_same_layout() -> None:
    from qcompiler.passes.reconstruct.qdrop import take_rows

    idx = torch.tensor([3, 0, 3, 5])
    for t in (torch.randn(6, 4, 3, 5).contiguous(memory_format=torch.channels_last), torch.randn(6, 4, 3, 5),
              torch.randn(6, 7), torch.randn(6, 4, 3, 5)[:, :, 1:]):
        got, ref = take_rows(t, idx), t[idx]
        assert torch.equal(got, ref)
        assert got.is_contiguous(memory_format=torch.channels_last) == t.is_contiguous(
            memory_format=torch.channels_last)
