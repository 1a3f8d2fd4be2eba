"""Topographic ResNet (perfect-square widths, conv bias as in the paper) and the digits data."""
import math

import pytest
import torch
from torch import nn

from datamodules.images import DigitsDataModule
from lightning_modules.topographic_resnet import PRESETS, TopographicClassifier, TopographicResNet


@pytest.mark.parametrize("preset", ["tiny", "resnet18"])
def test_every_conv_is_a_perfect_square_sheet_with_bias(preset):
    net = TopographicResNet(10, 3, stem="imagenet", **PRESETS[preset])
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert all(math.isqrt(c.out_channels) ** 2 == c.out_channels for c in convs)
    assert all(c.bias is not None for c in convs)
    if preset == "resnet18":
        assert len(convs) == 20  # stem + 16 block convs + 3 downsample convs, as ResNet-18
        assert sorted({c.out_channels for c in convs}) == [64, 144, 256, 529] and net.fc.in_features == 529
    assert net(torch.randn(2, 3, 64, 64)).shape == (2, 10)


def test_conv_bias_can_be_turned_off_and_blocks_are_torchvision():
    from torchvision.models.resnet import BasicBlock

    net = TopographicResNet(10, 1, stem="small", conv_bias=False, **PRESETS["tiny"])
    assert all(m.bias is None for m in net.modules() if isinstance(m, nn.Conv2d))
    assert sum(isinstance(m, BasicBlock) for m in net.modules()) == 3
    assert net(torch.randn(4, 1, 8, 8)).shape == (4, 10)


def test_bad_model_config():
    with pytest.raises(ValueError, match="preset='huge'"):
        TopographicClassifier(preset="huge")
    with pytest.raises(ValueError, match="need lr > 0"):
        TopographicClassifier(lr=0.0)
    with pytest.raises(ValueError, match="must be non-empty and of equal length"):
        TopographicResNet(10, 3, widths=[16, 36], blocks=[1])


def test_digits_split_is_stratified_and_scaled():
    dm = DigitsDataModule()
    dm.setup()
    x_tr, y_tr = dm.train_set.tensors
    x_te, y_te = dm.test_set.tensors
    assert len(y_tr) == 1347 and len(y_te) == 450 and x_tr.shape[1:] == (1, 8, 8)
    assert 0.0 <= float(x_tr.min()) and float(x_tr.max()) <= 1.0
    share = torch.bincount(y_te, minlength=10).float() / len(y_te)
    assert float(share.min()) > 0.09 and float(share.max()) < 0.11  # ~10% per class in both splits
    with pytest.raises(ValueError, match="data.batch_size must be >= 1, got 0"):
        DigitsDataModule(batch_size=0)
