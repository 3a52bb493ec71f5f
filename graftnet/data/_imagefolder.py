"""Your own images, in torchvision's ``ImageFolder`` layout: the ``imagefolder`` dataset.

The layout under ``data.kwargs.root``::

    root/train/<class>/<image>   required
    root/val/<class>/<image>     optional: used as given (see graftnet.data.make_splits), never redrawn
    root/test/<class>/<image>    optional: without it the task has no test split

Classes are the subfolders of ``train/``, sorted by name (class ``i`` is the ``i``-th), exactly as
``ImageFolder`` numbers them; ``val/`` and ``test/`` share that numbering and may lack classes but not add any.
Images are the files with one of torchvision's image extensions (``.png``, ``.jpg``, ``.jpeg``, ``.bmp``,
``.tif``, ``.webp`` …; other files are ignored), decoded by PIL only when served: labels come from the folder
names, so building the task and choosing classes never decode an image (but the first, when ``size`` is not
given).

Options (``data.kwargs``):

- ``root`` (required): the folder holding ``train/``; relative paths are resolved from the working directory.
- ``size``: ``h`` or ``[h, w]``; every image is resized to it (default: the first training image's size).
- ``grayscale``: one channel instead of RGB's three.
- ``mean`` and ``std``: per-channel normalisation, one number per channel (otherwise pixels stay in [0, 1]).
- ``augment`` (set by :func:`~graftnet.data.make_splits`): on ``train`` only, a random crop with
  ``min(h, w) // 8`` pixels of padding (4 at 32×32, CIFAR's) and a random horizontal flip; ``train_eval``,
  ``val`` and ``test`` are never augmented.

Examples:
    >>> from graftnet.data import make_splits
    >>> s = make_splits("imagefolder", {"root": "my_images", "size": 32})  # doctest: +SKIP
    >>> s.train[0][0].shape  # doctest: +SKIP
    torch.Size([3, 32, 32])
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch

from graftnet.data.sources import Source, register_dataset
from graftnet.errors import DataError

Root = str | os.PathLike[str]


def _load(path: str, mode: str) -> Any:
    """The image at ``path`` as a PIL image in ``mode`` ("RGB" or "L"), or a DataError naming the file."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.convert(mode)  # convert() decodes, so truncated files fail here, inside the try
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError … depending on the format and the damage
        raise DataError(
            f"imagefolder: cannot read the image {path}: {type(e).__name__}: {e}. Fix: replace or delete that file"
        ) from e


def _size(size: Any) -> tuple[int, int] | None:
    """``size`` (None, ``h`` or ``[h, w]``) as ``(h, w)``."""
    if size is None:
        return None
    parts = [size] if isinstance(size, int) else list(size) if isinstance(size, list | tuple) else None
    if (
        parts is None
        or len(parts) not in (1, 2)
        or any(isinstance(p, bool) or not isinstance(p, int) or p < 1 for p in parts)
    ):
        raise DataError(
            f"imagefolder: data.kwargs.size must be a positive integer or a list [height, width] of them, got {size!r}"
        )
    return (parts[0], parts[-1])


def _stats(name: str, values: Any, channels: int) -> tuple[float, ...]:
    """``data.kwargs.<name>`` (mean or std) as one float per channel."""
    if (
        not isinstance(values, list | tuple)
        or len(values) != channels
        or any(isinstance(v, bool) or not isinstance(v, int | float) for v in values)
    ):
        raise DataError(
            f"imagefolder: data.kwargs.{name} must be a list of {channels} number(s), one per channel "
            f"({'grayscale' if channels == 1 else 'RGB'}), got {values!r}"
        )
    if name == "std" and any(v <= 0 for v in values):
        raise DataError(f"imagefolder: data.kwargs.std must be positive in every channel, got {values!r}")
    return tuple(float(v) for v in values)


def _where(path: Path, root: Root) -> str:
    """``path``, with the ``root`` option it came from when that was relative (so the user sees both)."""
    return f"{path}" if Path(root).expanduser().is_absolute() else f"{path} (data.kwargs.root {str(root)!r})"


def _transform(
    size: tuple[int, int], *, augment: bool, mean: Sequence[float] | None, std: Sequence[float] | None
) -> Callable[[Any], torch.Tensor]:
    from torchvision import transforms

    steps: list[Callable[[Any], Any]] = [transforms.Resize(size)]
    if augment:
        steps.append(transforms.RandomCrop(size, padding=max(1, min(size) // 8)))
        steps.append(transforms.RandomHorizontalFlip())
    steps.append(transforms.ToTensor())
    if mean is not None and std is not None:
        steps.append(transforms.Normalize(mean, std))
    return transforms.Compose(steps)


def _with_transform(folder: Any, transform: Callable[[Any], torch.Tensor]) -> Any:
    """A view of ``folder`` serving its samples through ``transform``: no second scan of the disk."""
    from torchvision.datasets.vision import StandardTransform

    view = copy.copy(folder)  # shallow: both views share the sample list
    view.transform, view.transforms = transform, StandardTransform(transform, None)
    return view


def _folder(directory: Path, loader: Callable[[str], Any], transform: Callable[[Any], torch.Tensor] | None) -> Any:
    """``ImageFolder(directory)``, its "no class folder" error a DataError."""
    from torchvision.datasets import ImageFolder

    try:
        # allow_empty: empty class folders are reported below, by path, for train/; val/ and test/ may lack classes.
        return ImageFolder(str(directory), transform=transform, loader=loader, allow_empty=True)
    except FileNotFoundError as e:
        raise DataError(
            f"imagefolder: {directory} holds no class folders ({e}); put each class's images in a subfolder "
            f"named after the class, e.g. {directory / 'cat'}/1.png"
        ) from e


def _renumber(folder: Any, directory: Path, train_dir: Path, index: dict[str, int]) -> Any:
    """``folder`` (a val/ or test/ ImageFolder) with train/'s class numbering, not its own."""
    extra = [c for c in folder.classes if c not in index]
    if extra:
        raise DataError(
            f"imagefolder: {directory} has the class folder {extra[0]!r}, which {train_dir} does not have; classes "
            f"come from train/. Fix: add {train_dir / extra[0]} with training images, or rename or remove "
            f"{directory / extra[0]}"
        )
    if not folder.samples:
        raise DataError(
            f"imagefolder: {directory} holds no images; add images to its class folders, or remove the folder"
        )
    # ImageFolder numbered this folder's own (sorted) classes; the task numbers train's.
    folder.samples = [(path, index[folder.classes[target]]) for path, target in folder.samples]
    folder.imgs = folder.samples
    folder.targets = [target for _, target in folder.samples]
    folder.classes, folder.class_to_idx = list(index), dict(index)
    return folder


@register_dataset("imagefolder")
def imagefolder(
    *,
    augment: bool = True,
    root: Root | None = None,
    size: int | list[int] | None = None,
    grayscale: bool = False,
    mean: list[float] | None = None,
    std: list[float] | None = None,
) -> Source:
    """Images in ``root/train/<class>/``, and optionally ``root/val/<class>/`` and ``root/test/<class>/``.

    See the module docstring for the layout, the options and the augmentation.

    Raises:
        DataError: no ``root``, a missing ``root`` or ``train/``, a class folder without images, a ``val/`` or
            ``test/`` class that ``train/`` lacks, a bad option, or (when served) an image that cannot be read.
    """
    if root is None:
        raise DataError(
            "imagefolder: data.kwargs.root is required: the folder that holds train/<class>/ (and optionally "
            "val/ and test/). Fix: set data.kwargs.root"
        )
    shape = _size(size)
    if not isinstance(grayscale, bool):
        raise DataError(f"imagefolder: data.kwargs.grayscale must be true or false, got {grayscale!r}")
    channels = 1 if grayscale else 3
    if (mean is None) != (std is None):
        raise DataError(
            "imagefolder: data.kwargs.mean and data.kwargs.std go together; set both (one number per channel) "
            "or neither"
        )
    stats = (_stats("mean", mean, channels), _stats("std", std, channels)) if mean is not None else (None, None)

    path = Path(root).expanduser().absolute()
    if not path.is_dir():
        raise DataError(
            f"imagefolder: the folder {_where(path, root)} does not exist; point data.kwargs.root at the folder "
            f"that holds train/"
        )
    train_dir = path / "train"
    if not train_dir.is_dir():
        raise DataError(
            f"imagefolder: {_where(path, root)} has no train/ folder; the layout is root/train/<class>/<image> "
            f"(with optional root/val/ and root/test/ alike)"
        )
    loader = partial(_load, mode="L" if grayscale else "RGB")  # a partial of a module function: workers can pickle it
    train = _folder(train_dir, loader, None)  # only served through views: their transforms need the size, known below
    found = set(train.targets)
    empty = [name for i, name in enumerate(train.classes) if i not in found]
    if empty:
        raise DataError(
            f"imagefolder: the class folder {train_dir / empty[0]} holds no images"
            f"{f' (nor do {len(empty) - 1} more)' if len(empty) > 1 else ''}; add images (with an image "
            f"extension such as .png or .jpg) or remove the folder"
        )
    if shape is None:
        width, height = loader(train.samples[0][0]).size
        shape = (height, width)
    plain = _transform(shape, augment=False, mean=stats[0], std=stats[1])
    train_eval = _with_transform(train, plain)
    index = dict(train.class_to_idx)
    given: dict[str, Any] = {}
    for split in ("val", "test"):
        directory = path / split
        if directory.is_dir():
            given[split] = _renumber(_folder(directory, loader, plain), directory, train_dir, index)

    def targets(split: str) -> torch.Tensor | None:
        return torch.tensor(given[split].targets, dtype=torch.long) if split in given else None

    return Source(
        train=_with_transform(train, _transform(shape, augment=True, mean=stats[0], std=stats[1]))
        if augment
        else train_eval,
        train_eval=train_eval,
        test=given.get("test"),
        train_targets=torch.tensor(train.targets, dtype=torch.long),
        test_targets=targets("test"),
        num_classes=len(train.classes),
        input_shape=(channels, *shape),
        val=given.get("val"),
        val_targets=targets("val"),
    )
