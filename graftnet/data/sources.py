"""What a dataset builder returns, and the registry of builders by name (``data.dataset`` in a spec).

A builder (registered with :func:`register_dataset`) returns a :class:`Source`, the dataset's official splits;
:func:`graftnet.data.make_splits` turns it into the :class:`Splits` a run trains, selects and reports on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset

from graftnet.errors import DataError
from graftnet.registry import Registry

__all__ = ["DATASETS", "Augment", "DatasetBuilder", "Source", "Splits", "TensorData", "register_dataset"]

Augment = Callable[[torch.Tensor], torch.Tensor]


class TensorData(Dataset[tuple[torch.Tensor, int]]):
    """An in-memory dataset: inputs ``x`` (N, ...) and labels ``y`` (N,).

    ``augment`` works on whole batches (drawing from torch's global RNG); :func:`batches` applies it
    to training batches, so small built-in datasets skip the per-sample DataLoader machinery.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, augment: Augment | None = None) -> None:
        if len(x) != len(y):
            raise DataError(f"TensorData: {len(x)} inputs but {len(y)} labels")
        self.x, self.y, self.augment = x, y.long(), augment

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.x[i], int(self.y[i])


@dataclass(frozen=True)
class Source:
    """A dataset's official splits, as its builder returns them.

    ``train`` applies training augmentation when asked for; ``train_eval`` is the same samples in the
    same order without it (validation samples are carved from it). Targets are the labels in order, so
    class subsets never load an image.

    ``test`` and ``test_targets`` are None for data without a test split. ``val`` (with ``val_targets``) is a
    validation split the data brings with it: :func:`make_splits` then uses it as given rather than carving
    one from ``train_eval``.
    """

    train: Dataset[Any]
    train_eval: Dataset[Any]
    test: Dataset[Any] | None
    train_targets: torch.Tensor
    test_targets: torch.Tensor | None
    num_classes: int
    input_shape: tuple[int, ...]
    val: Dataset[Any] | None = None
    val_targets: torch.Tensor | None = None


DatasetBuilder = Callable[..., Source]
DATASETS: Registry[DatasetBuilder] = Registry("dataset", DataError)


def register_dataset(name: str) -> Callable[[DatasetBuilder], DatasetBuilder]:
    """Register ``builder(*, augment: bool, **kwargs) -> Source`` under ``name`` for specs' ``data.dataset``.

    Raises:
        DataError: ``name`` contains ``:`` (which marks a ``package.module:callable`` reference instead).
    """
    if ":" in name:
        raise DataError(
            f"register_dataset: {name!r} contains ':', which in data.dataset marks a 'package.module:callable' "
            f"reference; register the dataset under a name without ':'"
        )
    return DATASETS.register(name)


@dataclass(frozen=True)
class Splits:
    """The task a run works on: training, validation and test data with labels 0 … num_classes − 1.

    ``test`` is None for a task without a test split (a run then reports no test error).
    """

    train: Dataset[Any]
    val: Dataset[Any]
    test: Dataset[Any] | None
    num_classes: int
    input_shape: tuple[int, ...]
