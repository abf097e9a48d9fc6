"""BatchNorm folding for inference (covidct.models.fusion)."""

from __future__ import annotations

import torch
from timm.layers import BatchNormAct2d
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from covidct.models.fusion import fold_batchnorm


def _randomise(bn: nn.Module) -> None:
    """Running statistics and affine parameters unlike the defaults, so that folding is visible."""
    g = torch.Generator().manual_seed(0)
    n = bn.running_mean.numel()
    bn.running_mean.copy_(torch.randn(n, generator=g))
    bn.running_var.copy_(torch.rand(n, generator=g) + 0.5)
    bn.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
    bn.bias.data.copy_(torch.randn(n, generator=g))


class Residual(nn.Module):
    """The conv output feeds the BatchNorm *and* the sum: folding it would change the sum."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) + y


def _count(model: nn.Module, kinds) -> int:
    return sum(isinstance(m, kinds) for m in model.modules())


def test_folds_plain_timm_and_frozen_batchnorm_exactly() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), BatchNormAct2d(8, act_layer=nn.ReLU),
                        nn.Conv2d(8, 4, 1, bias=False), FrozenBatchNorm2d(4))
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)):
                _randomise(m)
    net.eval()
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        want = net(x)
    folded = fold_batchnorm(net, torch.randn(1, 1, 16, 16))
    assert _count(folded, (nn.BatchNorm2d, FrozenBatchNorm2d)) == 0
    assert _count(folded, nn.ReLU) == 2          # BatchNormAct2d's activation is kept
    with torch.no_grad():
        torch.testing.assert_close(folded(x), want, rtol=1e-5, atol=1e-5)
    # the original is untouched (a copy was folded)
    assert _count(net, (nn.BatchNorm2d, FrozenBatchNorm2d)) == 3
    with torch.no_grad():
        torch.testing.assert_close(net(x), want)


def test_a_conv_output_used_twice_is_left_alone() -> None:
    torch.manual_seed(1)
    net = Residual()
    with torch.no_grad():
        _randomise(net.bn)
    net.eval()
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        want = net(x)
    folded = fold_batchnorm(net, x, inplace=True)
    assert folded is net and isinstance(net.bn, nn.BatchNorm2d)   # the check failed, the fold was undone
    with torch.no_grad():
        torch.testing.assert_close(folded(x), want)
