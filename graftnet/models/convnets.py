"""Small convnets for the built-in data and the paper's supervised setups.

- ``cnn1d``: a 1-D convnet for MNIST-1D (Greydanus 2020 reports 94% with a CNN of this size).
- ``convnet``: a VGG-style 2-D convnet that adapts to any input size (global pooling), standing in for
  the MNIST and STL-10 models of Chen (2017) the paper uses.
- ``densenet_cifar``: DenseNet-BC for 32×32 inputs (Huang et al. 2017; the paper's depth 100, growth 24):
  torchvision's DenseNet with the CIFAR stem (one 3×3 convolution, no max-pool).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["Convnet", "cnn1d", "convnet", "densenet_cifar"]


class Convnet(nn.Module):
    """``features`` (conv → BN → ReLU blocks, named ``conv{i}``, ``bn{i}``, ``act{i}``), global pooling, ``head``.

    Each activation is a site or tap named ``features.act{i}``.
    """

    def __init__(
        self,
        dims: int,
        in_channels: int,
        channels: Sequence[int],
        num_classes: int,
        strides: Sequence[int] | None = None,
        kernel_size: int = 3,
        input_shape: tuple[int, ...] | None = None,
    ) -> None:
        super().__init__()
        conv = nn.Conv1d if dims == 1 else nn.Conv2d
        norm = nn.BatchNorm1d if dims == 1 else nn.BatchNorm2d
        pool = nn.AdaptiveAvgPool1d(1) if dims == 1 else nn.AdaptiveAvgPool2d(1)
        strides = list(strides) if strides is not None else [1] + [2] * (len(channels) - 1)
        if len(strides) != len(channels):
            raise ValueError(f"strides has {len(strides)} entries but channels has {len(channels)}")
        self.features = nn.Sequential()
        width = in_channels
        for i, (out, stride) in enumerate(zip(channels, strides, strict=True), start=1):
            self.features.add_module(f"conv{i}", conv(width, out, kernel_size, stride, kernel_size // 2, bias=False))
            self.features.add_module(f"bn{i}", norm(out))
            self.features.add_module(f"act{i}", nn.ReLU())
            width = out
        self.pool = pool
        self.head = nn.Linear(width, num_classes)
        if input_shape is not None:
            self.input_shape = input_shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.pool(self.features(x)), 1))


def cnn1d(
    in_channels: int = 1,
    channels: Sequence[int] = (32, 32, 32),
    num_classes: int = 10,
    kernel_size: int = 5,
    length: int = 40,
) -> Convnet:
    """A 1-D convnet for (in_channels, length) signals: stride 1, then stride 2 per further layer."""
    return Convnet(1, in_channels, channels, num_classes, kernel_size=kernel_size, input_shape=(in_channels, length))


def convnet(
    in_channels: int = 1,
    channels: Sequence[int] = (32, 64, 128),
    num_classes: int = 10,
    strides: Sequence[int] | None = None,
    image_size: int = 28,
) -> Convnet:
    """A 2-D convnet for (in_channels, image_size, image_size) images; any input size works (global pooling)."""
    return Convnet(2, in_channels, channels, num_classes, strides, input_shape=(in_channels, image_size, image_size))


def densenet_cifar(depth: int = 100, growth_rate: int = 24, num_classes: int = 10, drop_rate: float = 0.0) -> nn.Module:
    """DenseNet-BC with three dense blocks of (depth − 4) / 6 bottleneck layers and the CIFAR stem."""
    from torchvision.models import DenseNet

    if (depth - 4) % 6:
        raise ValueError(f"DenseNet-BC depth must be 6n + 4 (40, 100, 190 …), got {depth}")
    n = (depth - 4) // 6
    net = DenseNet(growth_rate, (n, n, n), 2 * growth_rate, bn_size=4, drop_rate=drop_rate, num_classes=num_classes)
    net.features.conv0 = nn.Conv2d(3, 2 * growth_rate, kernel_size=3, padding=1, bias=False)
    net.features.pool0 = nn.Identity()
    net.input_shape = (3, 32, 32)  # type: ignore[assignment]
    return net
