"""split_outliers: outlier input channels of linear layers split into copies, the product unchanged."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import qcompiler
from qcompiler.errors import ConfigError
from qcompiler.passes.split_outliers import copies


class OutlierMlp(nn.Module):
    """A LayerNorm whose gain makes two channels dwarf the rest, read by a feed-forward block and by a
    residual; ``export_only`` adds an in-place write symbolic_trace rejects (the torch.export path)."""

    def __init__(self, export_only: bool = False) -> None:
        super().__init__()
        self.export_only = export_only
        self.norm = nn.LayerNorm(32)
        with torch.no_grad():
            self.norm.weight[3] = 80.0
            self.norm.weight[17] = -50.0
        self.fc1, self.fc2 = nn.Linear(32, 64), nn.Linear(64, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.export_only:
            shift = torch.zeros(x.shape[0], 1, 1)
            shift[:, 0, 0] = 0.0
            x = x + shift
        h = self.norm(x)
        return self.fc2(torch.nn.functional.gelu(self.fc1(h))) + h[..., 20:]  # the residual without the outliers


def _data(n: int = 8) -> list[tuple[torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(16, 6, 32, generator=g),) for _ in range(n)]


def test_copies_split_the_largest_channel_until_budget_or_bulk():
    absmax = torch.tensor([40.0, 1, 1, 1, 1, 1, 1, 9.0])
    assert copies(absmax, 3) == [4, 1, 1, 1, 1, 1, 1, 1]  # 40 -> 20 -> 13.3 -> 10
    assert copies(absmax, 5) == [5, 1, 1, 1, 1, 1, 1, 2]  # then 9 > 10 / 1.25 ... 40 -> 8, 9 -> 4.5
    assert copies(absmax, 100) == [20, 1, 1, 1, 1, 1, 1, 5]  # stops once no copy exceeds 2 x median
    assert copies(torch.ones(8), 4) == [1] * 8


@pytest.mark.parametrize("export_only", [False, True])
def test_split_keeps_the_float_function_and_shrinks_the_quantization_error(export_only):
    torch.manual_seed(0)
    model = OutlierMlp(export_only).eval()
    data = _data()
    x = data[0][0]
    split = qcompiler.compile(model, example_inputs=(x,), calib=data, split_outliers=0.1, stop_after="split_outliers")
    with torch.no_grad():
        assert torch.allclose(split.program.gm(x), model(x), atol=1e-5)
    fc1 = [p for n, p in split.program.gm.named_parameters() if n.endswith("fc1.weight")][0]
    assert fc1.shape[1] > 32  # the outliers' columns repeated

    errors = {}
    for share in (0.0, 0.1):
        r = qcompiler.compile(model, example_inputs=(x,), calib=data, split_outliers=share)
        with torch.no_grad():
            errors[share] = float((r.fake_quant(x) - model(x)).norm() / model(x).norm())
        assert r.checks["integer_kernels"]["float_kernels"] == {}
    assert errors[0.1] < 0.75 * errors[0.0], errors  # measured: 0.020 against 0.032


def test_split_share_out_of_range_is_an_error():
    with pytest.raises(ConfigError, match="split-outliers"):
        qcompiler.compile(OutlierMlp(), example_inputs=(torch.randn(2, 6, 32),), calib=_data(1), split_outliers=1.5)
