"""LSQ: the step gradient, the fused forward/backward under QDrop, and the native kernel."""

from __future__ import annotations

import math

import pytest
import torch

from qcompiler.passes.reconstruct.qdrop import MaskPool
from qcompiler.quantizers import lsq, native
from qcompiler.quantizers.grid import QSpec, fake_quant
from qcompiler.quantizers.lsq import LSQQuantizer
from qcompiler.quantizers.uniform import UniformQuantizer

from conftest import require_native


def _act_quantizer(signed: bool) -> UniformQuantizer:
    bits = 8 if signed else 4
    q = UniformQuantizer(QSpec(bits, signed=signed, symmetric=False))
    q.scale.data = torch.tensor(0.1 if not signed else 0.01)
    q.zero_point.data = torch.tensor(3.0 if not signed else -7.0)
    q.mode = "quant"
    return q


@pytest.mark.parametrize("signed", [False, True])
def test_lsq_scale_gradient_matches_formula(signed: bool) -> None:
    q = _act_quantizer(signed)
    lsq = LSQQuantizer.from_quantizer(q)
    assert lsq.scale.requires_grad and not lsq.zero_point.requires_grad
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(4)) * (0.8 if not signed else 1.5)
    lsq(x).sum().backward()
    s, z = q.scale.detach(), q.zero_point
    v = torch.round(x / s) + z
    inside = (v >= q.qmin) & (v <= q.qmax)
    below = v < q.qmin
    assert bool(inside.any()) and bool(below.any()) and bool((v > q.qmax).any())
    per = torch.where(inside, -x / s + torch.round(x / s), torch.where(below, q.qmin - z, q.qmax - z))
    g = 1.0 / (x.numel() * (q.qmax - q.qmin)) ** 0.5
    torch.testing.assert_close(lsq.scale.grad, per.sum() * g)


@pytest.mark.parametrize("signed", [False, True])
def test_lsq_forward_equals_fake_quant(signed: bool) -> None:
    q = _act_quantizer(signed)
    lsq = LSQQuantizer.from_quantizer(q)
    x = torch.randn(4, 8, 5, 5, generator=torch.Generator().manual_seed(5))
    expected = fake_quant(x, q.scale, q.zero_point, q.qmin, q.qmax)
    assert torch.equal(lsq(x), expected)
    assert torch.equal(lsq(x), q(x))
    lsq.drop_prob = 1.0  # QDrop still applies
    assert torch.equal(lsq(x), x)
    lsq.mode = "off"
    assert torch.equal(lsq(x), x)


@pytest.mark.parametrize("axis", [None, 1])
def test_lsq_fused_gradients_match_autograd_composition_under_qdrop(axis: int | None) -> None:
    """The fused LSQ function gives the gradients autograd gives for where(keep, x, fake_quant(x))."""
    from qcompiler.passes.reconstruct.qdrop import MaskPool
    from qcompiler.quantizers.lsq import grad_scale_reference

    gen = torch.Generator().manual_seed(9)
    channels = 3 if axis is not None else None
    q = UniformQuantizer(QSpec(4, signed=False, symmetric=False, axis=axis), channels)
    q.scale.data = torch.tensor([0.1, 0.07, 0.12]) if axis is not None else torch.tensor(0.1)
    q.zero_point.data = torch.tensor([2.0, 0.0, 5.0]) if axis is not None else torch.tensor(2.0)
    q.mode = "quant"
    lsq = LSQQuantizer.from_quantizer(q)
    x = (torch.randn(4, 3, 6, 6, generator=gen) * 0.9).requires_grad_(True)
    upstream = torch.randn(4, 3, 6, 6, generator=gen)
    lsq.drop_prob, lsq.drop_masks = 0.5, MaskPool(0.5, torch.Generator().manual_seed(1), size=4096)
    state = lsq.drop_masks.gen.get_state()
    (lsq(x) * upstream).sum().backward()
    got_x, got_s = x.grad.clone(), lsq.scale.grad.clone()

    lsq.drop_masks.gen.set_state(state)  # the same keep-mask again
    keep = lsq.keep_mask(x)
    assert 0 < int(keep.sum()) < keep.numel()
    x.grad, scale = None, lsq.scale.detach().clone().requires_grad_(True)
    fq = grad_scale_reference(x, scale, lsq.zero_point, q.qmin, q.qmax, lsq.grad_factor(x), axis)
    ref = torch.where(keep.bool(), x, fq)
    (ref * upstream).sum().backward()
    torch.testing.assert_close(got_x, x.grad)
    torch.testing.assert_close(got_s, scale.grad)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("with_keep", [False, True])
def test_native_lsq_kernel_equals_torch_composition(with_keep: bool, channels_last: bool) -> None:
    """The C kernel gives bit-identical values and the same gradients as the torch composition, also
    on channels-last tensors (the kernel walks memory; the mask is drawn in the tensor's layout)."""
    require_native()
    gen = torch.Generator().manual_seed(11)
    s = torch.tensor(0.0625)
    x = torch.randn(3, 5, 7, 9, generator=gen) * 0.6
    x.view(-1)[:40] = (torch.arange(40) - 20) * 0.03125  # exact ties: x / s = k + 0.5
    upstream = torch.randn(x.shape, generator=gen)
    keep = None
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    if with_keep:
        keep = MaskPool(0.5, gen, size=64).mask(x)
        assert keep.stride() == x.stride() and 0.3 < float(keep.mean()) < 0.7
    assert native.usable(x, keep)
    results = []
    for use_native in (False, True):
        xi = x.detach().clone().requires_grad_(True)
        si = s.clone().requires_grad_(True)
        out = lsq._NativeLSQFakeQuant.apply(xi, si, -2.0, 13.0, 0.01, keep) if use_native else \
            lsq._LSQFakeQuant.apply(xi, si, -2.0, 13.0, 0.01, None, keep)
        (out * upstream).sum().backward()
        results.append((out.detach(), xi.grad, si.grad))
    (o1, gx1, gs1), (o2, gx2, gs2) = results
    assert torch.equal(o1, o2)
    assert torch.equal(gx1, gx2)
    torch.testing.assert_close(gs1, gs2, rtol=1e-5, atol=1e-7)


def test_native_lsq_kernel_splits_work_without_changing_results() -> None:
    """On a tensor of many blocks the kernels share the work among torch's threads; the values, and
    the step's gradient (summed per block, then in block order), do not depend on how many."""
    require_native()
    gen = torch.Generator().manual_seed(13)
    x = (torch.randn(8, 16, 24, 24, generator=gen) * 0.7).contiguous(memory_format=torch.channels_last)
    keep = MaskPool(0.5, gen, size=1 << 18).mask(x)
    g = torch.randn(x.shape, generator=gen)
    assert native.library().qc_lsq_blocks(x.numel()) > 4
    try:  # the kernels bind to torch's OpenMP runtime: one libgomp in the process, not a second pool
        with open("/proc/self/maps") as f:
            assert len({ln.split()[-1] for ln in f if "libgomp" in ln}) <= 1
    except OSError:
        pass
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            out, code = native.lsq_forward(x, keep, 0.0625, -2.0, 13.0)
            gx, gs = native.lsq_backward(g, x, code, 0.0625, -2.0, 13.0)
            results.append((out, code, gx, gs))
    finally:
        torch.set_num_threads(threads)
    for out, code, gx, gs in results[1:]:
        assert torch.equal(out, results[0][0]) and torch.equal(code, results[0][1])
        assert torch.equal(gx, results[0][2]) and gs == results[0][3]
    # Against the torch composition: the same output, gradient, and step gradient up to summation order.
    xi = x.detach().clone().requires_grad_(True)
    si = torch.tensor(0.0625, requires_grad=True)
    ref = lsq._LSQFakeQuant.apply(xi, si, -2.0, 13.0, 1.0, None, keep)
    (ref * g).sum().backward()
    assert torch.equal(ref.detach(), results[0][0]) and torch.equal(xi.grad, results[0][2])
    assert math.isclose(float(si.grad), results[0][3], rel_tol=1e-5)
