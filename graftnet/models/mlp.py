"""Multi-layer perceptrons, e.g. Hinton et al.'s 2×1200 MNIST teacher and 2×800 student."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["MLP", "mlp"]


class MLP(nn.Module):
    """Flatten, then ``Linear → ReLU (→ Dropout)`` per hidden layer, then a linear classifier."""

    def __init__(self, in_features: int, hidden: Sequence[int], num_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.input_shape = (in_features,)
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU()]
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = size
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def mlp(in_features: int = 784, hidden: Sequence[int] = (800, 800), num_classes: int = 10, dropout: float = 0.0) -> MLP:
    """Defaults: Hinton et al.'s 2×800 student; ``hidden=[1200, 1200], dropout=0.5`` gives the teacher."""
    return MLP(in_features, hidden, num_classes, dropout)
