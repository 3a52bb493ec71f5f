"""Checks that stop a run before it writes a state it could never recover from."""

from __future__ import annotations

import torch
from torch import nn

from graftnet.errors import TrainingError

__all__ = ["check_finite_state"]


@torch.no_grad()
def check_finite_state(model: nn.Module, when: str, hint: str = "", skip: tuple[str, ...] = ("teachers.",)) -> None:
    """Raise if a floating parameter or buffer of ``model`` (BatchNorm statistics included) is NaN or infinite.

    Tensors whose names start with ``skip`` (the frozen teachers, which training never changes) are not read.

    A finite loss does not prove a finite model: a diverging run can keep its loss finite while a BatchNorm
    ``running_var`` overflows, and such a state must never reach a checkpoint or an export.

    Raises:
        TrainingError: naming the first bad tensor and how many of its values are not finite.
    """
    named = (*model.named_parameters(), *model.named_buffers())
    tensors = [(n, t) for n, t in named if t.is_floating_point() and not n.startswith(skip)]
    if not tensors:
        return
    flags = torch.stack([torch.isfinite(t).all() for _, t in tensors]).tolist()  # one device-to-host copy
    for (name, t), ok in zip(tensors, flags, strict=True):
        if not ok:
            bad = int((~torch.isfinite(t)).sum())
            raise TrainingError(
                f"{when}: {name} has {bad} of {t.numel()} values that are NaN or infinite; training stopped. "
                + (hint or "Lower train.lr (or train.lambda1.final), or check the data for NaN/inf.")
            )
