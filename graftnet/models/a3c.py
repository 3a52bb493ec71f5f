"""The A3C convnet of Mnih et al. (2016) used by the knowledge-flow paper's Atari agents, and a MinAtar-size one."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["A3CNet", "ActorCriticMLP", "a3c", "a3c_minatar", "actor_critic_mlp"]


class A3CNet(nn.Module):
    """Convolutional trunk, one hidden dense layer, a policy head (logits) and a scalar value head.

    ``forward`` returns ``(policy_logits, value)`` with shapes ``(B, num_actions)`` and ``(B,)``; the
    policy is ``softmax(policy_logits)``.
    """

    def __init__(
        self,
        in_channels: int,
        num_actions: int,
        convs: list[tuple[int, int, int]],
        hidden: int,
        input_size: int,
    ) -> None:
        super().__init__()
        self.input_shape = (in_channels, input_size, input_size)
        layers: list[nn.Module] = []
        channels = in_channels
        for out_channels, kernel, stride in convs:
            layers += [nn.Conv2d(channels, out_channels, kernel, stride), nn.ReLU()]
            channels = out_channels
        self.features = nn.Sequential(*layers)
        with torch.no_grad():
            flat = self.features(torch.zeros(1, in_channels, input_size, input_size)).numel()
        self.fc = nn.Linear(flat, hidden)
        self.act = nn.ReLU()
        self.policy = nn.Linear(hidden, num_actions)
        self.value = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.act(self.fc(self.features(x).flatten(1)))
        return self.policy(h), self.value(h).squeeze(-1)


def a3c(num_actions: int = 6, in_channels: int = 4, input_size: int = 84) -> A3CNet:
    """Atari: conv 16 8×8/4, conv 32 4×4/2, fc 256, on 4 stacked 84×84 grey frames."""
    return A3CNet(in_channels, num_actions, [(16, 8, 4), (32, 4, 2)], 256, input_size)


def a3c_minatar(num_actions: int = 6, in_channels: int = 4, input_size: int = 10) -> A3CNet:
    """MinAtar: conv 16 3×3/1, fc 128, on 10×10 boards with C channels (4 to 10 by game)."""
    return A3CNet(in_channels, num_actions, [(16, 3, 1)], 128, input_size)


class ActorCriticMLP(nn.Module):
    """For classic control: ``Linear → Tanh`` hidden layers, then the policy (logits) and value heads."""

    def __init__(self, in_features: int, num_actions: int, hidden: tuple[int, ...] = (64, 64)) -> None:
        super().__init__()
        self.input_shape = (in_features,)
        layers: list[nn.Module] = []
        width = in_features
        for size in hidden:
            layers += [nn.Linear(width, size), nn.Tanh()]
            width = size
        self.body = nn.Sequential(*layers)
        self.policy = nn.Linear(width, num_actions)
        self.value = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(x)
        return self.policy(h), self.value(h).squeeze(-1)


def actor_critic_mlp(in_features: int = 4, num_actions: int = 2, hidden: list[int] | None = None) -> ActorCriticMLP:
    """Defaults fit CartPole-v1 (4 observations, 2 actions), two hidden layers of 64."""
    return ActorCriticMLP(in_features, num_actions, tuple(hidden) if hidden else (64, 64))
