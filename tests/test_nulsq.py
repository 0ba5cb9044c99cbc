"""nuLSQ: equal steps are LSQ, the step gradients are the surrogate's, and where it deploys."""

from __future__ import annotations

import pytest
import torch

import qcompiler
from qcompiler.backends import ort as ob
from qcompiler.config import ReconConfig
from qcompiler.errors import ConfigError
from qcompiler.passes.reconstruct.qdrop import MaskPool
from qcompiler.quantizers import nulsq
from qcompiler.quantizers.grid import QSpec
from qcompiler.quantizers.lsq import LSQQuantizer
from qcompiler.quantizers.nulsq import NuLSQQuantizer, levels_of
from qcompiler.quantizers.uniform import UniformQuantizer

from conftest import require_native


def _pair(seed: int = 0, bits: int = 3) -> tuple[torch.Tensor, LSQQuantizer, NuLSQQuantizer]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 8, 5, 5, generator=gen) * 1.5 + 0.4
    q = UniformQuantizer(QSpec(bits, False, False))
    q.set_range(torch.tensor(-1.0), torch.tensor(2.5))
    q.mode = "quant"
    return x, LSQQuantizer.from_quantizer(q), NuLSQQuantizer.from_quantizer(q)


def test_nulsq_with_equal_steps_computes_lsq_and_its_gradients_sum_to_lsqs():
    torch.manual_seed(0)
    x, lsq, nu = _pair()
    assert 0 < float(nu.zero_point) < nu.qmax  # levels on both sides of zero, inputs beyond both ends
    nu.begin_training(ReconConfig(iters=10))
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    g = torch.randn_like(x)
    a, b = lsq(x1), nu(x2)
    (a * g).sum().backward()
    (b * g).sum().backward()
    torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
    torch.testing.assert_close(x2.grad, x1.grad)
    torch.testing.assert_close(nu.steps.grad.sum(), lsq.scale.grad.reshape(()), rtol=1e-4, atol=1e-6)
    assert bool((x < nu.levels()[0]).any()) and bool((x > nu.levels()[-1]).any())


def _surrogate(x: torch.Tensor, steps: torch.Tensor, zero: int, m0: torch.Tensor, offset: torch.Tensor
               ) -> torch.Tensor:
    """nuLSQ with each round replaced by identity plus its frozen offset ``round(u0) - u0``."""
    levels = levels_of(steps, zero)
    u = (x - levels[m0]) / steps[m0]
    inner = levels[m0] + steps[m0] * (u + offset)
    top, bottom = levels[-1] + steps[-1] / 2, levels[0] - steps[0] / 2
    return torch.where(x > top, levels[-1], torch.where(x < bottom, levels[0], inner))


@pytest.mark.parametrize("seed", range(5))
def test_nulsq_step_gradients_match_finite_differences_of_the_surrogate(seed):
    torch.manual_seed(seed)
    x, _, nu = _pair(seed)
    nu.begin_training(ReconConfig(iters=10))
    with torch.no_grad():  # non-uniform steps
        nu.steps.mul_(torch.linspace(0.6, 1.5, nu.steps.numel()))
    g = torch.randn_like(x)
    (nu(x) * g).sum().backward()
    factor = 1.0 / (x.numel() * (nu.qmax - nu.qmin)) ** 0.5
    steps, zero = nu.steps.detach().double(), nu.zero_index()
    xd = x.double()
    levels = levels_of(steps, zero)
    m0 = torch.bucketize(xd, levels[1:-1])
    u0 = (xd - levels[m0]) / steps[m0]
    offset = torch.round(u0.clamp(0, 1)) - u0
    eps = 1e-6
    fd = torch.empty_like(steps)
    for j in range(steps.numel()):
        e = torch.zeros_like(steps)
        e[j] = eps
        up = (_surrogate(xd, steps + e, zero, m0, offset) * g).sum()
        down = (_surrogate(xd, steps - e, zero, m0, offset) * g).sum()
        fd[j] = (up - down) / (2 * eps)
    torch.testing.assert_close(nu.steps.grad.double(), fd * factor, rtol=1e-4, atol=1e-7)
    assert float(fd.abs().sum()) > 0


@pytest.mark.parametrize("bits,with_keep,channels_last", [(2, False, False), (4, True, True), (8, True, False)])
def test_native_nulsq_kernel_equals_torch_composition(bits, with_keep, channels_last):
    """The C kernel's values and input gradients equal the torch composition's bit for bit, its step
    gradients up to summation order: non-uniform steps, exact midpoints (ties), inputs beyond both
    ends, QDrop masks, channels-last memory, a tensor of several blocks."""
    require_native()
    gen = torch.Generator().manual_seed(bits)
    q = UniformQuantizer(QSpec(bits, False, False))
    q.set_range(torch.tensor(-1.0), torch.tensor(2.5))
    q.mode = "quant"
    nu = NuLSQQuantizer.from_quantizer(q)
    with torch.no_grad():
        nu.steps.mul_(torch.rand(nu.steps.shape, generator=gen) + 0.5)
    x = torch.randn(6, 16, 20, 20, generator=gen) * 1.5 + 0.4
    levels = nu.levels()
    mids = (levels[:-1] + levels[1:]) / 2
    x.view(-1)[: mids.numel()] = mids  # ties: the lower level wins
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    keep = MaskPool(0.5, gen, size=1 << 16).mask(x) if with_keep else None
    upstream = torch.randn(x.shape, generator=gen)
    factor, zero = 0.01, nu.zero_index()
    results = []
    for use_native in (False, True):
        xi = x.detach().clone().requires_grad_(True)
        steps = nu.steps.detach().clone().requires_grad_(True)
        if use_native:
            out = nulsq._NativeNonUniform.apply(xi, steps, zero, factor, keep)
        else:
            out = nulsq._NonUniform.apply(xi, steps, zero, factor)
            out = out if keep is None else torch.lerp(out, xi, keep)
        (out * upstream).sum().backward()
        results.append((out.detach(), xi.grad, steps.grad))
    (o1, gx1, gs1), (o2, gx2, gs2) = results
    assert torch.equal(o1, o2) and torch.equal(gx1, gx2)
    torch.testing.assert_close(gs2, gs1, rtol=1e-4, atol=1e-6)
    assert float(gs1.abs().min()) > 0 and bool((gx1 == 0).any())  # every step learns; some inputs clamp
    assert bool((x < levels[0]).any()) and bool((x > levels[-1]).any())


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_deployed_level_table_computes_the_quantizer_bit_for_bit(bits):
    x, _, nu = _pair(2, bits)
    with torch.no_grad():
        nu.steps.mul_(torch.rand(nu.steps.shape, generator=torch.Generator().manual_seed(3)) + 0.5)
    deployed = nu.float_module()
    assert torch.equal(deployed(x), nu(x))
    assert deployed(x).unique().numel() > (1 << bits) // 2  # many levels in use, not a constant


def test_nulsq_needs_a_float_target(tiny):
    with pytest.raises(ConfigError, match="nulsq activation quantizers have no integer form.*onnx-fp"):
        qcompiler.compile(str(tiny), bits="w4a4", method="qdrop", act_quantizer="nulsq", iters=5)


def test_nulsq_learned_in_reconstruction_deploys_to_onnx_fp_and_ort_agrees(tiny, tmp_path):
    out = tmp_path / "nu.onnx"
    r = qcompiler.compile(str(tiny), bits="w4a4", method="qdrop", act_quantizer="nulsq", target="onnx-fp",
                          iters=60, a_lr=1e-3, output=out)
    nus = [m for m in r.program.gm.modules() if isinstance(m, NuLSQQuantizer)]
    assert nus and any(float(q.steps.std()) > 0 for q in nus)  # the levels became non-uniform
    agree = r.checks["agreement"]
    assert agree["mean_error"] <= 1e-3  # float summation order flips a level on few values only
    counts = ob.optimized_op_counts(out.read_bytes())
    assert counts["Gather"] >= len(nus) and not any(k in ob.INT_COMPUTE for k in counts)


def test_native_nulsq_kernel_passes_nan_through():
    """A NaN activation comes out NaN (as from LSQ's kernel), not as a read outside the level table."""
    require_native()
    q = UniformQuantizer(QSpec(8, False, False))
    q.set_range(torch.tensor(-1.0), torch.tensor(2.5))
    q.mode = "quant"
    nu = NuLSQQuantizer.from_quantizer(q)
    x = torch.linspace(-3.0, 4.0, 100_000)
    x[::7] = float("nan")
    out = nulsq._NativeNonUniform.apply(x, nu.steps, nu.zero_index(), 0.01, None)
    assert torch.isnan(out[::7]).all() and torch.isfinite(out[1::7]).all()
