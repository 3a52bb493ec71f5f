"""Scoring a model on a split: class scores, loss and accuracy, from a Dataset or the user's DataLoader."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn
from torch.utils.data import DataLoader

from graftnet.data import batches
from graftnet.errors import TrainingError

__all__ = ["check_labels", "eval_batches", "evaluate", "logits_of", "pair", "predict"]


def logits_of(out: Any) -> torch.Tensor:
    """The class scores of a model's output: the tensor itself, or the first element of a tuple."""
    if isinstance(out, (tuple, list)) and out:
        out = out[0]
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        raise TrainingError(
            "supervised training needs a model that returns class scores of shape (batch, classes), got "
            + (f"shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__)
        )
    return out


def pair(item: Any, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)`` from a batch of a Dataset or DataLoader, or a clear error naming the split and what it got."""
    if isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], torch.Tensor):
        x, y = item
        y = torch.as_tensor(y)
        if not y.is_floating_point() and not y.is_complex() and y.dtype != torch.bool:
            y = y.long()  # int32, uint8 … indices: the loss takes int64 (a no-op on it); check_labels names the rest
        return x, y
    if isinstance(item, dict):
        got = f"a dict with keys {sorted(map(str, item))}"
    elif isinstance(item, (tuple, list)):
        got = f"a {type(item).__name__} of length {len(item)}" + (
            f" whose first element is a {type(item[0]).__name__}" if len(item) == 2 else ""
        )
    else:
        got = f"a {type(item).__name__}"
    raise TrainingError(
        f"{where}: a batch must be (inputs, labels) with inputs a tensor, got {got}; have the Dataset's "
        "__getitem__ return (input, label), or give a DataLoader whose collate_fn makes (inputs, labels) batches"
    )


def check_labels(y: torch.Tensor, where: str, classes: int | None = None) -> None:
    """Labels are class indices: an integer tensor of shape (batch,), each in 0 … ``classes`` − 1 if it is given."""
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool or y.dim() != 1:
        if y.dim() == 2 and y.shape[1] == 1:
            fix = "one label per sample: squeeze the last dimension"
        elif y.dim() == 2 and y.dtype.is_floating_point:
            fix = "soft or one-hot labels? give class indices, labels.argmax(-1)"
        elif y.dtype.is_floating_point:
            fix = "give them as integers, labels.long()"
        else:
            fix = "give one integer class index per sample"
        raise TrainingError(
            f"{where}: labels must be class indices, an integer tensor of shape (batch,); got "
            f"{str(y.dtype).removeprefix('torch.')} of shape {tuple(y.shape)} ({fix})"
        )
    if classes is None or not len(y):
        return
    low, high = int(y.min()), int(y.max())
    if low < 0 or high >= classes:
        raise TrainingError(
            f"{where}: labels run from {low} to {high} but the student outputs {classes} classes; labels must be "
            f"0 … {classes - 1} (set the student's num_classes, or map the labels)"
        )


def eval_batches(data: Any, batch_size: int, where: str = "data") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """In-order batches of a Dataset, or the batches of a DataLoader as it gives them."""
    if isinstance(data, DataLoader):
        for item in data:
            yield pair(item, where)
        return
    for item in batches(data, batch_size):
        yield pair(item, where)


@torch.no_grad()
def predict(model: nn.Module, data: Any, batch_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``model``'s class scores for every sample of ``data``, in eval mode (the mode is restored), and the labels."""
    was = model.training
    model.eval()
    outs, labels = [], []
    for x, y in eval_batches(data, batch_size):
        outs.append(logits_of(model(x.to(device))).cpu())
        labels.append(y)
    model.train(was)
    return torch.cat(outs), torch.cat(labels)


def evaluate(
    model: nn.Module, data: Any, batch_size: int, device: torch.device, where: str = "data"
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``data``, per sample; labels it cannot score are a
    :class:`TrainingError` naming ``where``."""
    logits, labels = predict(model, data, batch_size, device)
    check_labels(labels, where, logits.shape[1])
    loss = float(F.cross_entropy(logits, labels))
    return loss, float((logits.argmax(-1) == labels).float().mean())
