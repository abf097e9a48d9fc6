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


def test_seg_predictor_with_folded_batchnorms_predicts_as_before() -> None:
    """A U-Net (ResNet-18 encoder, smp decoder) with non-trivial BatchNorm statistics: the folded copy
    inside ``SegPredictor`` gives the same probabilities and labels; the caller's model keeps its BatchNorms."""
    import numpy as np

    from covidct.engine.infer import SegPredictor
    from covidct.models import SegModelConfig, build_seg_model

    torch.manual_seed(0)
    net = build_seg_model(SegModelConfig(encoder="resnet18", decoder_channels=(32, 16, 16, 8, 8), input_size=64))
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                _randomise(m)
    n_bn = _count(net, nn.BatchNorm2d)
    images = [np.random.default_rng(k).random((80, 72), dtype=np.float32) for k in range(3)]
    plain = SegPredictor(net, fold_bn=False, crop_to_lung=False, density_classes=False).predict(images)
    folded_predictor = SegPredictor(net, crop_to_lung=False, density_classes=False)
    folded = folded_predictor.predict(images)
    assert _count(folded_predictor.model, nn.BatchNorm2d) == 0 and _count(net, nn.BatchNorm2d) == n_bn > 0
    for a, b in zip(plain, folded):
        np.testing.assert_allclose(b.probs, a.probs, atol=1e-4)
        np.testing.assert_allclose(b.lung_prob, a.lung_prob, atol=1e-4)
        assert (a.labels != b.labels).mean() < 1e-3
