"""The tiny pair the objective tests train: a two-layer 1-D convnet student, a teacher of its architecture, and a
site at each layer tapping the teacher's same layer."""

from __future__ import annotations

import torch

import graftnet

CNN = {"num_classes": 3, "channels": [8, 8]}
SITES = [{"student": f"features.act{i}", "taps": [f"t:features.act{i}"]} for i in (1, 2)]


def cnn(seed: int, classes: int = 3) -> torch.nn.Module:
    torch.manual_seed(seed)
    return graftnet.build_model("graftnet:cnn1d", {**CNN, "num_classes": classes})


def pair_and_batch() -> tuple[torch.nn.Module, torch.nn.Module, graftnet.GraftedModel, torch.Tensor, torch.Tensor]:
    """``(student, teacher, graft of the two at SITES, x, y)`` with a batch of 16 three-class samples."""
    student, teacher = cnn(0), cnn(1)
    x, y = torch.randn(16, 1, 40), torch.randint(0, 3, (16,))
    return student, teacher, graftnet.graft(student, {"t": teacher}, {"sites": SITES}, example_input=x[:2]), x, y


def take_steps(objective: graftnet.Objective, x: torch.Tensor, y: torch.Tensor, steps: int = 2) -> None:
    """``steps`` Adam steps of ``objective`` on one batch, as a user's own loop takes them."""
    opt = torch.optim.Adam(objective.param_groups())
    for _ in range(steps):
        loss = objective.loss(x, y)
        opt.zero_grad()
        loss.total.backward()
        objective.step(opt)
