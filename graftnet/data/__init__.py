"""Datasets by name, and the train/validation/test splits a run trains, selects and reports on (DESIGN.md §8).

A dataset builder (registered in :data:`DATASETS`) returns a :class:`Source`: the dataset's official
training and test splits. :func:`make_splits` then makes the task a spec asks for: a class subset, a
label mapping, a validation split carved from the training split (never from the test split), and a
limit on training samples, all drawn with the data seed so every method sees the same samples.

Built in and offline: ``digits`` (scikit-learn) and ``mnist1d`` (generated). With torchvision:
``cifar10``, ``cifar100``, ``svhn``, ``mnist``, ``emnist_letters``, ``emnist_digits``, ``stl10``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from graftnet.errors import DataError
from graftnet.registry import Registry

__all__ = [
    "DATASETS",
    "Relabeled",
    "Source",
    "Splits",
    "TensorData",
    "batches",
    "make_splits",
    "register_dataset",
]

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
    """

    train: Dataset[Any]
    train_eval: Dataset[Any]
    test: Dataset[Any]
    train_targets: torch.Tensor
    test_targets: torch.Tensor
    num_classes: int
    input_shape: tuple[int, ...]


DatasetBuilder = Callable[..., Source]
DATASETS: Registry[DatasetBuilder] = Registry("dataset", DataError)


def register_dataset(name: str) -> Callable[[DatasetBuilder], DatasetBuilder]:
    """Register ``builder(*, augment: bool, **kwargs) -> Source`` under ``name`` for specs' ``data.dataset``."""
    return DATASETS.register(name)


class Relabeled(Dataset[tuple[Any, int]]):
    """The samples ``indices`` of ``dataset`` with labels sent through ``label_map``."""

    def __init__(self, dataset: Dataset[Any], indices: Sequence[int], label_map: dict[int, int]) -> None:
        self.dataset, self.indices, self.label_map = dataset, list(indices), label_map
        self.labels: list[int] | None = None  # overrides the samples' labels (shuffled-label controls)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        x, y = self.dataset[self.indices[i]]
        return x, self.label_map[int(y)] if self.labels is None else self.labels[i]


@dataclass(frozen=True)
class Splits:
    """The task a run works on: training, validation and test data with labels 0 … num_classes − 1."""

    train: Dataset[Any]
    val: Dataset[Any]
    test: Dataset[Any]
    num_classes: int
    input_shape: tuple[int, ...]


def _subset(
    dataset: Dataset[Any], indices: torch.Tensor, label_map: dict[int, int], targets: torch.Tensor | None = None
) -> Dataset[Any]:
    """Samples ``indices`` relabelled through ``label_map``; ``targets`` (original labels, one per index)
    replaces the samples' own labels, for shuffled-label controls."""
    if isinstance(dataset, TensorData):
        lut = torch.full((int(dataset.y.max()) + 1,), -1, dtype=torch.long)
        for old, new in label_map.items():
            if old < len(lut):
                lut[old] = new
        labels = dataset.y[indices] if targets is None else targets
        return TensorData(dataset.x[indices], lut[labels], dataset.augment)
    subset = Relabeled(dataset, indices.tolist(), label_map)
    if targets is not None:
        subset.labels = [label_map[int(t)] for t in targets]
    return subset


def make_splits(
    dataset: str,
    kwargs: dict[str, Any] | None = None,
    *,
    classes: Sequence[int] | None = None,
    label_map: dict[int, int] | None = None,
    train_size: int | None = None,
    val_size: int | float = 0.1,
    augment: bool = True,
    shuffle_labels: bool = False,
    seed: int = 0,
) -> Splits:
    """Build ``dataset`` and cut it into the task's splits.

    Args:
        dataset: a registered dataset name.
        kwargs: the builder's options (``root``, ``download``, ``samples`` …).
        classes: keep only these classes; by default they are relabelled 0 … k−1 in the listed order.
        label_map: explicit ``{original label: new label}`` for the kept classes (may merge classes).
        train_size: keep at most this many training samples (after the validation split is taken).
        val_size: validation samples, as a count or a fraction of the (class-filtered) training split.
        augment: apply the dataset's training augmentation to training batches.
        shuffle_labels: permute the labels of the training and validation samples at random (with ``seed``):
            a control task with nothing to learn but memorisation.
        seed: draws the validation split and the training subset.

    Raises:
        DataError: unknown dataset, classes it lacks, or sizes larger than the data.

    Examples:
        >>> s = make_splits("digits", classes=[0, 1, 2], train_size=30, val_size=50)
        >>> len(s.train), len(s.val), s.num_classes
        (30, 50, 3)
    """
    source = DATASETS.get(dataset)(augment=augment, **dict(kwargs or {}))
    present = sorted(set(source.train_targets.tolist()))
    keep = list(classes) if classes is not None else present
    missing = [c for c in keep if c not in present]
    if missing:
        raise DataError(f"data.classes: {dataset} has no class {missing[0]} (its classes: {present})")
    relabelled = classes is not None or label_map is not None
    if label_map is None:
        label_map = {c: i for i, c in enumerate(keep)} if classes is not None else {c: c for c in keep}
    else:
        unmapped = [c for c in keep if c not in label_map]
        if unmapped:
            raise DataError(f"data.label_map: class {unmapped[0]} is kept but has no new label")
        label_map = {c: label_map[c] for c in keep}
    num_classes = max(label_map.values()) + 1 if relabelled else source.num_classes

    def members(targets: torch.Tensor) -> torch.Tensor:
        return torch.nonzero(torch.isin(targets, torch.tensor(keep)), as_tuple=True)[0]

    pool = members(source.train_targets)
    n_val = int(round(val_size * len(pool))) if isinstance(val_size, float) else int(val_size)
    if not 0 < n_val < len(pool):
        raise DataError(
            f"data.val_size: {val_size} leaves no training or no validation samples from {len(pool)} "
            f"training samples of {dataset}"
        )
    order = pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))]
    val_idx, train_idx = order[:n_val], order[n_val:]
    if train_size is not None:
        if train_size > len(train_idx):
            raise DataError(
                f"data.train_size: {train_size} requested but {dataset} has only {len(train_idx)} training "
                f"samples of the kept classes after the {n_val} validation samples"
            )
        train_idx = train_idx[:train_size]
    train_targets = val_targets = None
    if shuffle_labels:
        permutation = torch.randperm(len(order), generator=torch.Generator().manual_seed(seed + 1))
        shuffled = source.train_targets[order][permutation]
        val_targets, train_targets = shuffled[:n_val], shuffled[n_val : n_val + len(train_idx)]
    train = _subset(source.train if augment else source.train_eval, train_idx, label_map, train_targets)
    val = _subset(source.train_eval, val_idx, label_map, val_targets)
    test = _subset(source.test, members(source.test_targets), label_map)
    return Splits(train, val, test, num_classes, source.input_shape)


def batches(
    dataset: Dataset[Any],
    batch_size: int,
    *,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    skip: int = 0,
    train: bool = False,
    num_workers: int = 0,
    shard: tuple[int, int] = (0, 1),
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of ``(x, y)``: shuffled with ``generator``, the first ``skip`` batches left out (for resuming).

    ``batch_size`` is the global batch. With ``shard=(rank, world)`` each process takes every ``world``-th
    sample of each global batch, starting at ``rank`` — the distributed sampler of data-parallel training:
    the processes together see exactly the batches one process would, so the step is the same.

    In-memory :class:`TensorData` is sliced directly and augmented per batch when ``train`` is set;
    other datasets go through a ``DataLoader`` over the remaining indices, so skipped batches are never loaded.
    """
    rank, world = shard
    n = len(dataset)  # type: ignore[arg-type]
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    order = order[skip * batch_size :]
    local = [order[start : start + batch_size][rank::world] for start in range(0, len(order), batch_size)]
    if isinstance(dataset, TensorData):
        for idx in local:
            x = dataset.x[idx]
            if train and dataset.augment is not None:
                x = dataset.augment(x)
            yield x, dataset.y[idx]
        return
    loader = DataLoader(
        dataset, batch_sampler=[idx.tolist() for idx in local], num_workers=num_workers, generator=generator
    )
    yield from loader


from graftnet.data import _builtin, _vision  # noqa: E402,F401  - registers the built-in and torchvision datasets
