"""Wide-ResNet for 32×32 inputs (Zagoruyko & Komodakis 2016), the WRN-28-1/2/5/10 of Born-Again Networks.

WRN-d-k has three stages of n = (d − 4) / 6 pre-activation basic blocks, of widths 16k, 32k and 64k, after a
3×3 stem convolution of 16 channels. Every ReLU is its own module, called once, so each one is a graftable
site with a readable name: ``stage{s}.{b}.act1``, ``stage{s}.{b}.act2`` and the final ``act``.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["WideResNet", "wide_resnet_cifar"]


class BasicBlock(nn.Module):
    """BN → ReLU → conv3×3 → BN → ReLU → dropout → conv3×3, plus the shortcut.

    When the shape changes, the 1×1 shortcut convolution reads the pre-activated input (``act1``'s output),
    as in the reference implementation; otherwise the shortcut is the raw input.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, drop_rate: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.act1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.act2 = nn.ReLU()
        # An nn.Module rather than F.dropout(training=self.training): the traced graph must not depend on the mode.
        self.dropout: nn.Module = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.shortcut: nn.Conv2d | None = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride, 0, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act1(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(h)
        h = self.conv1(h)
        h = self.conv2(self.dropout(self.act2(self.bn2(h))))
        return h + shortcut


def _stage(in_channels: int, out_channels: int, stride: int, n: int, drop_rate: float) -> nn.Sequential:
    """n blocks; only the first changes the width and the resolution."""
    return nn.Sequential(
        *(
            BasicBlock(in_channels if b == 0 else out_channels, out_channels, stride if b == 0 else 1, drop_rate)
            for b in range(n)
        )
    )


class WideResNet(nn.Module):
    """WRN-``depth``-``widen_factor`` for 32×32 images.

    The modules are ``stem``, ``stage1``–``stage3`` (nn.Sequential of blocks), ``bn``, ``act``, ``pool``, ``head``.

    Args:
        depth: 6n + 4 (10, 16, 22, 28, 40 …), for n blocks per stage.
        widen_factor: k; the stages are 16k, 32k and 64k channels wide.
        num_classes: outputs of the linear head.
        drop_rate: dropout between the two convolutions of every block (the paper uses 0.3 on CIFAR).
        in_channels: channels of the 32×32 input images.

    Raises:
        ValueError: ``depth`` is not 6n + 4 with n ≥ 1, or ``widen_factor`` is below 1.
    """

    def __init__(
        self,
        depth: int = 28,
        widen_factor: int = 10,
        num_classes: int = 100,
        drop_rate: float = 0.0,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"Wide-ResNet depth must be 6n + 4 with n ≥ 1 (10, 16, 22, 28, 40 …), got {depth}")
        if widen_factor < 1:
            raise ValueError(f"Wide-ResNet widen_factor must be a positive integer, got {widen_factor}")
        n = (depth - 4) // 6
        widths = [16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.stem = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.stage1 = _stage(16, widths[0], 1, n, drop_rate)
        self.stage2 = _stage(widths[0], widths[1], 2, n, drop_rate)
        self.stage3 = _stage(widths[1], widths[2], 2, n, drop_rate)
        self.bn = nn.BatchNorm2d(widths[2])
        self.act = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(widths[2], num_classes)
        self.input_shape: tuple[int, ...] = (in_channels, 32, 32)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stage3(self.stage2(self.stage1(self.stem(x))))
        return self.head(torch.flatten(self.pool(self.act(self.bn(h))), 1))


def wide_resnet_cifar(
    depth: int = 28,
    widen_factor: int = 10,
    num_classes: int = 100,
    drop_rate: float = 0.0,
    in_channels: int = 3,
) -> WideResNet:
    """WRN-``depth``-``widen_factor`` for (in_channels, 32, 32) images; WRN-28-10 with 100 classes has 36.5M weights.

    Examples:
        >>> net = wide_resnet_cifar(depth=16, widen_factor=2, num_classes=10)
        >>> net(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """
    return WideResNet(depth, widen_factor, num_classes, drop_rate, in_channels)
