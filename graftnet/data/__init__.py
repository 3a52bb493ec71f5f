"""Datasets by name, and the train/validation/test splits a run trains, selects and reports on (docs/architecture.md).

A dataset builder (registered in :data:`DATASETS`) returns a :class:`Source`: the dataset's official
training and test splits. :func:`make_splits` then makes the task a spec asks for: a class subset, a
label mapping, a validation split carved from the training split (never from the test split), and a
limit on training samples, all drawn with the data seed so every method sees the same samples.

Built in and offline: ``digits`` (scikit-learn) and ``mnist1d`` (generated). With torchvision:
``cifar10``, ``cifar100``, ``svhn``, ``mnist``, ``emnist_letters``, ``emnist_digits``, ``stl10``, and
``imagefolder`` (your own images in torchvision's ``ImageFolder`` layout: ``root/train/<class>/…``, with
optional ``val/`` and ``test/`` folders).

Your own code, by reference: ``data.dataset: "package.module:callable"`` imports ``package.module`` and calls
``callable(augment=…, **data.kwargs)``, which returns a :class:`Source`, a :class:`Splits`, or a mapping
``{"train": …, "val": …, "test": …, "num_classes": …}`` (see :func:`make_splits`). Registered names never
contain ``:``, so anything with one is a reference. It runs that code: a spec is as trusted as a script.

A validation split the data brings with it (an image folder's ``val/``, a reference's ``val``) is used as
given, never redrawn; see :func:`make_splits` for what that rules out.
"""

from __future__ import annotations

import importlib
import inspect
import operator
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset

from graftnet.data.sources import DATASETS, Source, Splits, TensorData, register_dataset
from graftnet.errors import DataError, GraftError, SpecError
from graftnet.spec import MAX_SEED, clip, short_repr

if TYPE_CHECKING:
    from graftnet.spec import Spec

__all__ = [
    "DATASETS",
    "Relabeled",
    "Source",
    "Splits",
    "TensorData",
    "batches",
    "make_splits",
    "register_dataset",
    "task_splits",
]

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


_MAPPING_KEYS = ("train", "val", "test", "num_classes")
_RETURNS = (
    "a graftnet.data.Source, a graftnet.data.Splits, or a mapping with the keys train (required), val, test "
    "and num_classes"
)


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

    ``dataset`` is a registered name or a reference ``package.module:callable`` (anything with a ``:``).
    A reference imports that module and calls ``callable(augment=augment, **kwargs)``: it runs user code,
    so a spec naming one is as trusted as a script (the same rule as model references). The call returns:

    - a :class:`Source`: used exactly as a registered builder's;
    - a :class:`Splits`: the task as given;
    - a mapping ``{"train": …, "val": …, "test": …, "num_classes": …}`` of map-style datasets serving
      ``(input tensor, integer label)`` samples; only ``train`` is required. ``num_classes`` defaults to the
      largest label + 1 over all the splits and ``input_shape`` is the first training input's shape. Labels
      are read once per split when the data is built: from :class:`TensorData`'s ``y`` or a ``targets``
      attribute when the dataset has one, otherwise by loading every sample once (give large datasets a
      ``targets`` attribute to avoid that). A mapping has a single ``train`` dataset, so a validation split
      carved from it is served with the same transform, augmentation included; return a :class:`Source`
      to keep augmentation out of validation.

    A validation split the data brings with it (a :class:`Splits`, a mapping's ``val``, a source's ``val``
    such as an image folder's ``val/``) is used as given, never redrawn: ``val_size`` is ignored, and
    ``classes``, ``label_map`` and ``shuffle_labels`` are refused (filter or relabel in the data itself);
    ``train_size`` still keeps the first ``train_size`` samples of a ``seed``-ed permutation of the training
    split. Without one, the validation split is carved from the training split as for any dataset. The test
    split is kept whole, unless ``classes`` or ``label_map`` filter it to the kept classes and relabel it.

    Args:
        dataset: a registered dataset name, or a ``package.module:callable`` reference.
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
        DataError: unknown dataset, a reference that cannot be imported or returns something else, samples
            that are not ``(tensor, label)`` pairs, classes the data lacks, sizes larger than the data, or
            options that a given validation split rules out.

    Examples:
        >>> s = make_splits("digits", classes=[0, 1, 2], train_size=30, val_size=50)
        >>> len(s.train), len(s.val), s.num_classes
        (30, 50, 3)
    """
    if not _is_label(seed) or not 0 <= operator.index(seed) <= MAX_SEED:
        raise DataError(f"data.seed must be an integer from 0 to {MAX_SEED} (2**32 - 1), got {short_repr(seed)}")
    seed = operator.index(seed)  # a numpy integer, say: torch's generators take ints only
    built = _build(dataset, dict(kwargs or {}), augment)
    if isinstance(built, Source) and built.val is not None:
        train = built.train if augment else built.train_eval
        built = Splits(train, built.val, built.test, built.num_classes, built.input_shape)
    if isinstance(built, Splits):
        return _keep_given(
            dataset, built, classes=classes, label_map=label_map, shuffle_labels=shuffle_labels,
            train_size=train_size, seed=seed,
        )  # fmt: skip
    return _draw(
        dataset, built, classes=classes, label_map=label_map, train_size=train_size, val_size=val_size,
        augment=augment, shuffle_labels=shuffle_labels, seed=seed,
    )  # fmt: skip


def _build(dataset: str, kwargs: dict[str, Any], augment: bool) -> Source | Splits:
    """What ``dataset`` (a registered name or a reference) gives: a :class:`Source`, or given :class:`Splits`."""
    if ":" not in dataset:
        try:
            builder = DATASETS.get(dataset)
        except DataError as e:  # keeps the registry's "did you mean" list; adds where, and the other way
            raise DataError(f"data.dataset: {e}. Or name your own code as 'package.module:callable'.") from None
        return _call_builder(dataset, builder, kwargs, augment)
    result = _call_reference(dataset, kwargs, augment)
    if isinstance(result, Splits):
        _check_given(dataset, result)
        return result
    if isinstance(result, Source):
        return result
    if isinstance(result, Mapping):
        return _from_mapping(dataset, result)
    raise DataError(f"data.dataset: {dataset} returned a {type(result).__name__}; it must return {_RETURNS}")


# What a registered builder raises for an option value it cannot use ('<' between a str and an int, a seed out of
# numpy's range); named and placed at data.kwargs by _call_builder. GraftErrors (a builder's own DataError) pass.
_BUILDER_ERRORS = (TypeError, ValueError, OverflowError)


def _call_builder(dataset: str, builder: Any, kwargs: dict[str, Any], augment: bool) -> Source:
    """``builder(augment=augment, **kwargs)``, its options checked against its signature first."""
    try:
        signature = inspect.signature(builder)
    except (TypeError, ValueError):  # no signature to inspect (some C callables): the call itself will say
        signature = None
    accepted = "none"
    if signature is not None:
        params = [p for p in signature.parameters.values() if p.name != "augment"]
        accepted = ", ".join(
            f"{p.name}={short_repr(p.default)}" if p.default is not p.empty else p.name for p in params
        )
        try:
            signature.bind(augment=augment, **kwargs)
        except TypeError as e:
            raise DataError(
                f"data.kwargs: dataset {dataset!r} does not take {short_repr(kwargs)} ({e}); its options are "
                f"{accepted or 'none'}"
            ) from e
    try:
        return builder(augment=augment, **kwargs)  # type: ignore[no-any-return]
    except GraftError:
        raise
    except _BUILDER_ERRORS as e:
        raise DataError(
            f"data.kwargs: dataset {dataset!r} cannot be built with {short_repr(kwargs)}: {type(e).__name__}: "
            f"{clip(str(e))}; check the values (its options: {accepted or 'none'})"
        ) from e


def _draw(
    dataset: str,
    source: Source,
    *,
    classes: Sequence[int] | None,
    label_map: dict[int, int] | None,
    train_size: int | None,
    val_size: int | float,
    augment: bool,
    shuffle_labels: bool,
    seed: int,
) -> Splits:
    """The task cut from ``source``: classes kept and relabelled, validation carved from training (seeded)."""
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
    test = source.test  # nothing to filter or relabel: all of it, even classes the training split lacks
    if source.test is not None and relabelled:
        # A user's Source may leave test_targets out; registered builders always give them.
        test_targets = source.test_targets if source.test_targets is not None else _labels(source.test, dataset, "test")
        test = _subset(source.test, members(test_targets), label_map)
    return Splits(train, val, test, num_classes, source.input_shape)


def _keep_given(
    dataset: str,
    splits: Splits,
    *,
    classes: Sequence[int] | None,
    label_map: dict[int, int] | None,
    shuffle_labels: bool,
    train_size: int | None,
    seed: int,
) -> Splits:
    """``splits`` as given (its validation split came with the data), less training samples beyond ``train_size``."""
    options = (("classes", classes), ("label_map", label_map), ("shuffle_labels", shuffle_labels or None))
    refused = [name for name, value in options if value is not None]
    if refused:
        names = ", ".join(f"data.{name}" for name in refused)
        raise DataError(
            f"{names}: {dataset} brings its own validation split, which graftnet uses as given; these options "
            f"apply only when graftnet draws the splits. Fix: drop them and keep or relabel the classes in the "
            f"data itself (your dataset code, or the class folders), or leave the validation split out so "
            f"graftnet carves one from the training split."
        )
    if train_size is None:
        return splits
    n = len(splits.train)  # type: ignore[arg-type]
    if train_size > n:
        raise DataError(
            f"data.train_size: {train_size} requested but {dataset}'s training split has only {n} samples; "
            f"lower data.train_size or drop it"
        )
    keep = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:train_size]
    return Splits(_take(splits.train, keep), splits.val, splits.test, splits.num_classes, splits.input_shape)


def _take(dataset: Dataset[Any], indices: torch.Tensor) -> Dataset[Any]:
    """Samples ``indices`` of ``dataset``, labels untouched; in-memory data stays in memory (and batch-augmented)."""
    if isinstance(dataset, TensorData):
        return TensorData(dataset.x[indices], dataset.y[indices], dataset.augment)
    return Subset(dataset, indices.tolist())


def _call_reference(ref: str, kwargs: dict[str, Any], augment: bool) -> Any:
    """What ``callable(augment=augment, **kwargs)`` returns for ``ref = "package.module:callable"``."""
    module_name, _, attr = ref.partition(":")
    if not module_name or not attr:
        raise DataError(
            f"data.dataset: {ref!r} is not a registered dataset name, and as a reference it must look like "
            f"'package.module:callable' (e.g. 'mydata.sets:build'), with both parts non-empty"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise DataError(
            f"data.dataset: cannot import {module_name!r} for {ref!r}: {e}. Fix: install that package, or run from "
            f"the folder that holds the module (or add that folder to PYTHONPATH)"
        ) from e
    factory: Any = module
    for part in attr.split("."):
        if not hasattr(factory, part):
            raise DataError(
                f"data.dataset: module {module_name!r} has no attribute {attr!r} (from {ref!r}); check the name "
                f"after the ':'"
            )
        factory = getattr(factory, part)
    if not callable(factory):
        raise DataError(
            f"data.dataset: {ref} is a {type(factory).__name__}, not a callable; point it at a function (or class) "
            f"that takes augment and data.kwargs and returns {_RETURNS}"
        )
    try:
        inspect.signature(factory).bind(augment=augment, **kwargs)
    except TypeError as e:  # checked before the call, so a TypeError raised inside the user's code is not masked
        given = ", ".join(["augment", *kwargs])
        raise DataError(
            f"data.kwargs: {ref} cannot be called with ({given}): {e}. Fix: make it accept the keyword augment, "
            f"and match data.kwargs to its parameters"
        ) from e
    except ValueError:
        pass  # no signature to inspect (some C callables): the call itself will say what is wrong
    return factory(augment=augment, **kwargs)


def _describe(sample: Any) -> str:
    if isinstance(sample, tuple | list):
        return f"a {type(sample).__name__} of ({', '.join(type(part).__name__ for part in sample)})"
    return f"a {type(sample).__name__}"


def _is_label(y: Any) -> bool:
    if isinstance(y, bool):  # True would pass as 1: almost certainly a mistake
        return False
    try:
        operator.index(y)  # int, numpy integers, one-element integer tensors
    except (TypeError, RuntimeError):
        return False
    return True


def _check_sample(sample: Any, ref: str, split: str, i: int) -> int:
    """The label of ``sample``, sample ``i`` of ``ref``'s ``split``, once it proves an ``(input tensor, int)`` pair."""
    if not (
        isinstance(sample, tuple | list)
        and len(sample) == 2
        and isinstance(sample[0], torch.Tensor)
        and _is_label(sample[1])
    ):
        raise DataError(
            f"data.dataset: sample {i} of {ref}'s {split} split is {_describe(sample)}; every sample must be an "
            f"(input tensor, integer label) pair. Fix the dataset's __getitem__ (for images, end its transform "
            f"with torchvision.transforms.ToTensor())"
        )
    return operator.index(sample[1])


def _length(dataset: Any, ref: str, split: str) -> int:
    """``len(dataset)``, once it proves a non-empty map-style dataset."""
    if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
        raise DataError(
            f"data.dataset: {ref}'s {split} split is a {type(dataset).__name__}, not a map-style dataset; it must "
            f"support len() and indexing, like a torch.utils.data.Dataset with __len__ and __getitem__ "
            f"(IterableDataset is not supported)"
        )
    n = len(dataset)
    if n == 0:
        raise DataError(f"data.dataset: {ref}'s {split} split is empty; give it samples, or leave it out")
    return n


def _check_given(ref: str, splits: Splits) -> None:
    """Check that a :class:`Splits` a reference returned serves ``(tensor, label)`` samples (first ones only)."""
    for split, ds in (("train", splits.train), ("val", splits.val), ("test", splits.test)):
        if ds is not None:
            _length(ds, ref, split)
            _check_sample(ds[0], ref, split, 0)


def _labels(dataset: Any, ref: str, split: str) -> torch.Tensor:
    """The labels of ``dataset`` in order: ``TensorData.y``, else its ``targets``, else from every sample.

    The fallback loads every sample once: the cost of a dataset without ``targets``.
    """
    n = _length(dataset, ref, split)
    first = _check_sample(dataset[0], ref, split, 0)  # even with cheap labels, the samples must be pairs
    if isinstance(dataset, TensorData):
        return dataset.y
    targets = getattr(dataset, "targets", None)
    if targets is None:
        rest = [_check_sample(dataset[i], ref, split, i) for i in range(1, n)]
        return torch.tensor([first, *rest], dtype=torch.long)
    fix = "fix it, or remove it so graftnet reads the labels from the samples"
    where = f"data.dataset: the targets attribute of {ref}'s {split} split"
    try:
        labels = torch.as_tensor(targets)
    except (TypeError, ValueError, RuntimeError) as e:
        raise DataError(f"{where} is not {n} integer labels ({type(targets).__name__}: {e}); {fix}") from e
    if labels.shape != (n,) or labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise DataError(
            f"{where} is not {n} integer labels (got shape {tuple(labels.shape)}, dtype {labels.dtype}); {fix}"
        )
    if int(labels[0]) != first:
        raise DataError(
            f"{where} says sample 0 has label {int(labels[0])}, but the sample itself has label {first}; targets "
            f"must list the samples' labels in order"
        )
    return labels.long()


def _from_mapping(ref: str, result: Mapping[Any, Any]) -> Source | Splits:
    """The :class:`Splits` (with ``val``) or :class:`Source` (without) of a reference's mapping."""
    unknown = [repr(k) for k in result if k not in _MAPPING_KEYS]
    if unknown:
        raise DataError(
            f"data.dataset: {ref} returned a mapping with unknown keys {', '.join(unknown)}; the allowed keys are "
            f"train (required), val, test and num_classes"
        )
    train, val, test = result.get("train"), result.get("val"), result.get("test")
    if train is None:
        raise DataError(
            f"data.dataset: {ref} returned a mapping without 'train'; the training split is required "
            f"(val, test and num_classes are optional)"
        )
    labels = {split: _labels(ds, ref, split) for split, ds in (("train", train), ("val", val), ("test", test))
              if ds is not None}  # fmt: skip
    low = min(int(t.min()) for t in labels.values())
    high = max(int(t.max()) for t in labels.values())
    if low < 0:
        raise DataError(f"data.dataset: {ref} has a negative label ({low}); labels must run 0 … num_classes − 1")
    num_classes = result.get("num_classes")
    if num_classes is None:
        num_classes = high + 1
    elif not _is_label(num_classes) or operator.index(num_classes) < 1:
        raise DataError(
            f"data.dataset: {ref} returned num_classes {short_repr(num_classes)}; it must be a positive integer, or "
            f"left out to count the classes from the labels"
        )
    elif high >= operator.index(num_classes):
        raise DataError(
            f"data.dataset: {ref} returned num_classes {num_classes} but has a label {high}; labels must run "
            f"0 … num_classes − 1. Raise num_classes, or leave it out to count the classes from the labels"
        )
    num_classes = operator.index(num_classes)
    input_shape = tuple(train[0][0].shape)
    if val is not None:
        return Splits(train, val, test, num_classes, input_shape)
    return Source(train, train, test, labels["train"], labels.get("test"), num_classes, input_shape)


def task_splits(spec: Spec) -> Splits:
    """The data of ``spec.data`` (see :func:`make_splits`), checked against the spec's ``input_shape``.

    Raises:
        SpecError: the spec has no ``data`` section, or its ``input_shape`` disagrees with the data's.
        DataError: as :func:`make_splits`.
    """
    d = spec.data
    if d is None:
        raise SpecError(
            "data: the spec has no data section, so there is no task to build; add one (e.g. data: {dataset: digits})"
        )
    splits = make_splits(
        d.dataset, d.kwargs, classes=d.classes, label_map=d.label_map, train_size=d.train_size,
        val_size=d.val_size, augment=d.augment, shuffle_labels=d.shuffle_labels, seed=d.seed,
    )  # fmt: skip
    if spec.input_shape is not None and tuple(spec.input_shape) != tuple(splits.input_shape):
        raise SpecError(
            f"input_shape: the spec says {list(spec.input_shape)} but {d.dataset} samples are "
            f"{list(splits.input_shape)}; fix input_shape or drop it (it is taken from the data)"
        )
    return splits


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


from graftnet.data import _builtin, _imagefolder, _vision  # noqa: E402,F401  - registers the datasets
