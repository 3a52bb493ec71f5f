"""Optimizers and schedules: parameter groups for the student, the mixing logits w and the adapters Q.

Adam moves each logit w by about its learning rate per step, whatever the gradient's size, so w needs a
learning rate of its own (see :func:`default_lr_mixing`); the student and the adapters get theirs.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from graftnet.errors import TrainingError
from graftnet.spec import TrainSpec

__all__ = ["default_lr_mixing", "lr_factor", "make_optimizer", "param_groups", "set_lr"]


def default_lr_mixing(settings: TrainSpec, total_steps: int) -> float:
    """The learning rate of w when ``train.lr_mixing`` is not set: :attr:`TrainSpec.mixing_lr_factor` × ``lr``.

    That is 10 × ``lr`` under Adam and 0.1 × under SGD. With the p_w floor on (the default), the floor hands every
    site back to the student by the cut, so w only has to learn how far to trust the teachers meanwhile. Without a
    floor (``p_w_floor: null``) w alone must push p_w(student) ≥ 0.999, a logit gap of ~7–10, and Adam moves w
    about its learning rate per step: w may then also move 20 units over the λ1 ramp, which short runs need (a
    too-slow w leaves p_w(student) near 0.9). That was the default with the floor on too until the transfer study
    found it too fast with the feature hint (examples/README.md, "w's learning rate with the hint").

    Examples:
        >>> default_lr_mixing(TrainSpec(lr=1e-3), total_steps=1000)
        0.01
        >>> default_lr_mixing(TrainSpec(lr=0.3, optimizer="sgd"), total_steps=1000)
        0.03
        >>> default_lr_mixing(TrainSpec(lr=1e-3, p_w_floor=None), total_steps=1000)   # ramp 10–60%: 500 steps
        0.04
    """
    relative = settings.mixing_lr_factor * settings.lr
    if settings.p_w_floor is not None:
        return relative
    ramp_steps = max(1.0, (settings.lambda1.end - settings.lambda1.start) * total_steps)
    return max(relative, 20.0 / ramp_steps)


def param_groups(model: nn.Module, settings: TrainSpec, total_steps: int | None = None) -> list[dict[str, Any]]:
    """Optimizer parameter groups ``student``, ``mixing`` (the logits w) and ``adapters`` (Q and input adapters).

    Each has its own learning rate (``lr``, ``lr_mixing``, ``lr_adapters``; unset, the last two default to
    :func:`default_lr_mixing` and :attr:`TrainSpec.adapter_lr`); w never decays. A group is
    left out when it has no trainable parameter, and every group carries its ``name``.

    Raises:
        TrainingError: the model has mixers, ``lr_mixing`` is not set, and ``total_steps`` is unknown.
    """
    groups: dict[str, list[nn.Parameter]] = {"student": [], "mixing": [], "adapters": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("mixing.") and name.endswith(".logits"):
            groups["mixing"].append(p)
        elif name.startswith(("mixing.", "input_adapters.")):
            groups["adapters"].append(p)
        else:
            groups["student"].append(p)
    mixing_lr = settings.lr_mixing
    if mixing_lr is None and groups["mixing"]:
        if total_steps is None:
            raise TrainingError(
                "the default learning rate of the mixing logits depends on the length of training: pass total_steps "
                "(epochs × batches per epoch), or set lr_mixing"
            )
        mixing_lr = default_lr_mixing(settings, total_steps)
    lrs = {"student": settings.lr, "mixing": mixing_lr, "adapters": settings.adapter_lr}
    decay = {"student": settings.weight_decay, "mixing": 0.0, "adapters": settings.weight_decay}
    return [{"params": ps, "lr": lrs[k], "weight_decay": decay[k], "name": k} for k, ps in groups.items() if ps]


def make_optimizer(groups: list[dict[str, Any]], settings: TrainSpec) -> torch.optim.Optimizer:
    """``train.optimizer`` (adam, adamw or sgd with ``train.momentum``, Nesterov when momentum > 0) over ``groups``."""
    if settings.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=settings.lr, momentum=settings.momentum, nesterov=settings.momentum > 0)
    if settings.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=settings.lr)
    return torch.optim.Adam(groups, lr=settings.lr)


def lr_factor(schedule: str, progress: float) -> float:
    """The learning-rate multiplier at ``progress`` ∈ [0, 1] of training: ``cosine`` decays to 0, ``constant`` is 1."""
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))) if schedule == "cosine" else 1.0


def set_lr(optimizer: torch.optim.Optimizer, base_lrs: list[float], schedule: str, progress: float) -> None:
    """Every group's learning rate at ``progress``: its base rate times :func:`lr_factor`."""
    factor = lr_factor(schedule, progress)
    for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
        group["lr"] = base * factor
