"""torchvision's image datasets: CIFAR-10/100, SVHN, MNIST, EMNIST letters and digits, STL-10.

torchvision finds, downloads (only when ``download`` is set) and parses each dataset's official files under
``root``, in torchvision's own layout; the builders here keep the parsed images in memory as uint8 arrays and
serve ``(float tensor (C, H, W), int label)`` samples through torchvision's transforms. Labels are always
``0 … num_classes − 1``; targets come from the label files, so class subsets never decode an image.

Every builder takes the same options (``data.kwargs`` in a spec):

- ``root``: the folder holding the files (relative paths are resolved from the working directory).
- ``download``: fetch missing files into ``root`` (off by default; with it off, absent files raise
  :class:`~graftnet.errors.DataError` before torchvision is even imported).
- ``normalize``: subtract the dataset's usual per-channel mean and divide by its standard deviation
  (otherwise pixels stay in [0, 1]).
- ``augment`` (set by :func:`~graftnet.data.make_splits`): the standard training augmentation on ``train``;
  ``train_eval`` and ``test`` are never augmented.

Checksums: torchvision checks the md5 of every CIFAR, SVHN and STL-10 file each time it opens them, even with
``download=False``. That rejects any copy that is not the byte-exact official release (re-packed mirrors,
the tiny fixtures the tests write), hashes hundreds of MB on every run, and for STL-10 demands the 2.6 GB
unlabelled split these builders never read. So with ``download=False`` the files only have to be present and
parse (a wrong or truncated file still fails loudly, as a ``DataError``, when its arrays or labels come out
wrong); with ``download=True`` torchvision's checksums decide whether to fetch a file again, which is where
they mean something.

Examples:
    >>> from graftnet.data.sources import make_splits
    >>> s = make_splits("cifar10", {"root": "data"}, val_size=5000)  # doctest: +SKIP
    >>> s.train[0][0].shape, s.num_classes  # doctest: +SKIP
    (torch.Size([3, 32, 32]), 10)
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

from graftnet.data.sources import Source, register_dataset
from graftnet.errors import DataError

Root = str | os.PathLike[str]


@dataclass(frozen=True)
class _Info:
    """What a builder knows before torchvision is imported: files, shape, statistics and augmentation."""

    name: str
    files: tuple[str, ...]  # relative to root: every file that download=False needs
    num_classes: int
    input_shape: tuple[int, int, int]  # (C, H, W)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    padding: int  # RandomCrop(H, padding=padding)
    flip: bool  # RandomHorizontalFlip


class _Split(NamedTuple):
    images: np.ndarray  # (N, H, W) or (N, H, W, C) uint8, upright (views are fine)
    targets: torch.Tensor  # (N,) int64, 0-based


class _Images(Dataset[tuple[torch.Tensor, int]]):
    """uint8 images and their labels, served as ``(transform(PIL image), label)``.

    Holds plain arrays rather than torchvision dataset objects, so it pickles for DataLoader workers under
    any start method and the augmented and plain views of a split share one copy of the pixels.
    """

    def __init__(self, images: np.ndarray, targets: torch.Tensor, transform: Callable[[Any], torch.Tensor]) -> None:
        self.images, self.targets, self.transform = images, targets, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), int(self.targets[i])


def _transform(info: _Info, *, augment: bool, normalize: bool) -> Callable[[Any], torch.Tensor]:
    from torchvision import transforms

    steps: list[Callable[[Any], Any]] = []
    if augment:
        steps.append(transforms.RandomCrop(info.input_shape[1], padding=info.padding))
        if info.flip:
            steps.append(transforms.RandomHorizontalFlip())
    steps.append(transforms.ToTensor())
    if normalize:
        steps.append(transforms.Normalize(info.mean, info.std))
    return transforms.Compose(steps)


def _without_md5(cls: type, **file_lists: list[Any] | dict[str, Any]) -> type:
    """``cls`` with the md5 sums in its file lists set to None, so its checks only ask that each file exists.

    The file lists are the class attributes torchvision's own ``_check_integrity`` reads; a subclass keeps
    torchvision untouched for every other caller. See the module docstring for why.
    """
    return type(f"{cls.__name__}Unverified", (cls,), file_lists)


def _no_md5(entries: list[list[str]]) -> list[list[str | None]]:
    return [[*entry[:-1], None] for entry in entries]


def _cifar(root: str, download: bool, *, hundred: bool) -> tuple[_Split, _Split]:
    from torchvision import datasets

    stock = datasets.CIFAR100 if hundred else datasets.CIFAR10
    unverified = _without_md5(
        stock,
        train_list=_no_md5(stock.train_list),
        test_list=_no_md5(stock.test_list),
        meta={**stock.meta, "md5": None},
    )
    train = (stock if download else unverified)(root, train=True, download=download)
    test = unverified(root, train=False)  # one archive holds both splits; with download on, the line above verified it
    return (
        _Split(train.data, torch.tensor(train.targets, dtype=torch.long)),
        _Split(test.data, torch.tensor(test.targets, dtype=torch.long)),
    )


def _channels_last(images: np.ndarray, labels: np.ndarray) -> _Split:
    """A split from torchvision's (N, C, H, W) uint8 images (viewed as (N, H, W, C), no copy) and numpy labels."""
    return _Split(np.transpose(images, (0, 2, 3, 1)), torch.from_numpy(labels.astype(np.int64)))


def _svhn(root: str, download: bool) -> tuple[_Split, _Split]:
    from torchvision import datasets

    stock = datasets.SVHN
    split_list = {split: [*entry[:-1], None] for split, entry in stock.split_list.items()}
    cls = stock if download else _without_md5(stock, split_list=split_list)
    splits = []
    for name in ("train", "test"):  # separate files, each fetched and verified on its own
        ds = cls(root, split=name, download=download)
        splits.append(_channels_last(ds.data, ds.labels))  # torchvision already maps label 10 (digit 0) to 0
    return splits[0], splits[1]


def _stl10(root: str, download: bool) -> tuple[_Split, _Split]:
    from torchvision import datasets

    stock = datasets.STL10
    # Only the labelled files: the unlabelled split (train_list[2]) is neither read nor required.
    unverified = _without_md5(stock, train_list=_no_md5(stock.train_list[:2]), test_list=_no_md5(stock.test_list))
    # torchvision undoes STL-10's column-major storage and makes labels 0-based; images are (N, C, H, W).
    train = (stock if download else unverified)(root, split="train", download=download)
    test = unverified(root, split="test")
    return _channels_last(train.data, train.labels), _channels_last(test.data, test.labels)


def _mnist(root: str, download: bool) -> tuple[_Split, _Split]:
    from torchvision import datasets

    train = datasets.MNIST(root, train=True, download=download)  # fetches all four files
    test = datasets.MNIST(root, train=False)
    return _Split(train.data.numpy(), train.targets), _Split(test.data.numpy(), test.targets)


def _emnist(root: str, download: bool, *, split: str) -> tuple[_Split, _Split]:
    from torchvision import datasets

    train = datasets.EMNIST(root, split=split, train=True, download=download)  # one archive holds every split
    test = datasets.EMNIST(root, split=split, train=False)
    offset = 1 if split == "letters" else 0  # letters are labelled 1 … 26 (0 is an unused "N/A" class)
    # EMNIST's files store each image transposed (NIST's column-major conversion) and torchvision serves them
    # as stored; swapping H and W makes characters upright, as MNIST's are, so flips and crops mean the same.
    return (
        _Split(train.data.transpose(1, 2).numpy(), train.targets - offset),
        _Split(test.data.transpose(1, 2).numpy(), test.targets - offset),
    )


def _resolve(root: Root) -> Path:
    return Path(root).expanduser().absolute()


def _require_files(info: _Info, root: Root, path: Path) -> None:
    missing = [f for f in info.files if not (path / f).is_file()]
    if not missing:
        return
    where = f"{path}" if Path(root).expanduser().is_absolute() else f"{path} (data.kwargs.root {str(root)!r})"
    which = "all of them" if len(missing) == len(info.files) else ", ".join(missing)
    raise DataError(
        f"{info.name}: dataset files not found under {where}, and data.kwargs.download is false. Expected there: "
        f"{', '.join(info.files)} (missing: {which}). Fix: set data.kwargs.download: true to fetch them into that "
        f"folder, or point data.kwargs.root at the folder that holds them."
    )


def _check_split(info: _Info, split: _Split, which: str, path: Path) -> None:
    c, h, w = info.input_shape
    expected = (h, w) if c == 1 else (h, w, c)
    where = f"{info.name}'s {which} split under {path}"
    if tuple(split.images.shape[1:]) != expected:
        raise DataError(
            f"{where}: images are {tuple(split.images.shape[1:])}, expected {expected}; the files do not hold "
            f"{info.name}. Point data.kwargs.root at the official files, or set data.kwargs.download: true."
        )
    if len(split.images) == 0 or len(split.images) != len(split.targets):
        raise DataError(
            f"{where}: {len(split.images)} images but {len(split.targets)} labels; the files are empty or do not "
            f"belong together. Replace them (data.kwargs.download: true fetches the official ones)."
        )
    low, high = int(split.targets.min()), int(split.targets.max())
    if low < 0 or high >= info.num_classes:
        raise DataError(
            f"{where}: labels run from {low} to {high} once converted, outside 0 … {info.num_classes - 1}; the label "
            f"file does not hold {info.name} labels. Replace it (data.kwargs.download: true fetches the official one)."
        )


def _build(
    info: _Info,
    read: Callable[[str, bool], tuple[_Split, _Split]],
    *,
    augment: bool,
    root: Root,
    download: bool,
    normalize: bool,
) -> Source:
    path = _resolve(root)
    if not download:
        _require_files(info, root, path)
    try:
        train, test = read(str(path), download)
    except Exception as e:  # torchvision, pickle, scipy.io and numpy each raise their own types for bad files
        if download:
            action, fix = (
                "download or read",
                "check the network connection, or fetch the files elsewhere and point data.kwargs.root at them",
            )
        else:
            action, fix = (
                "read",
                "the files may be truncated or not the official release; delete them and set "
                "data.kwargs.download: true to fetch them again, or point data.kwargs.root at a good copy",
            )
        raise DataError(
            f"{info.name}: could not {action} the dataset under {path}: {type(e).__name__}: {e}. Fix: {fix}"
        ) from e
    _check_split(info, train, "training", path)
    _check_split(info, test, "test", path)
    plain = _transform(info, augment=False, normalize=normalize)
    train_eval = _Images(train.images, train.targets, plain)
    augmented = _Images(train.images, train.targets, _transform(info, augment=True, normalize=normalize))
    return Source(
        train=augmented if augment else train_eval,
        train_eval=train_eval,
        test=_Images(test.images, test.targets, plain),
        train_targets=train.targets,
        test_targets=test.targets,
        num_classes=info.num_classes,
        input_shape=info.input_shape,
    )


def _under(folder: str, *names: str) -> tuple[str, ...]:
    return tuple(f"{folder}/{name}" for name in names)


_CIFAR10 = _Info(
    "cifar10",
    _under("cifar-10-batches-py", *(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta"),
    10,
    (3, 32, 32),
    (0.4914, 0.4822, 0.4465),
    (0.2470, 0.2435, 0.2616),
    padding=4,
    flip=True,
)
_CIFAR100 = _Info(
    "cifar100",
    _under("cifar-100-python", "train", "test", "meta"),
    100,
    (3, 32, 32),
    (0.5071, 0.4865, 0.4409),
    (0.2673, 0.2564, 0.2762),
    padding=4,
    flip=True,
)
_SVHN = _Info(
    "svhn",
    ("train_32x32.mat", "test_32x32.mat"),
    10,
    (3, 32, 32),
    (0.4377, 0.4438, 0.4728),
    (0.1980, 0.2010, 0.1970),
    padding=4,
    flip=False,  # flipped digits are other digits, or none
)
_STL10 = _Info(
    "stl10",
    _under("stl10_binary", "train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin"),
    10,
    (3, 96, 96),
    (0.4467, 0.4398, 0.4066),
    (0.2603, 0.2566, 0.2713),
    padding=12,
    flip=True,
)
_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
_MNIST = _Info("mnist", _under("MNIST/raw", *_MNIST_FILES), 10, (1, 28, 28), (0.1307,), (0.3081,), 2, False)


def _emnist_files(split: str) -> tuple[str, ...]:
    return _under(
        "EMNIST/raw",
        *(
            f"emnist-{split}-{part}-{kind}"
            for part in ("train", "test")
            for kind in ("images-idx3-ubyte", "labels-idx1-ubyte")
        ),
    )


_EMNIST_LETTERS = _Info("emnist_letters", _emnist_files("letters"), 26, (1, 28, 28), (0.1722,), (0.3309,), 2, False)
_EMNIST_DIGITS = _Info("emnist_digits", _emnist_files("digits"), 10, (1, 28, 28), (0.1733,), (0.3317,), 2, False)


@register_dataset("cifar10")
def cifar10(*, augment: bool = True, root: Root = "data", download: bool = False, normalize: bool = True) -> Source:
    """CIFAR-10: 50 000 training and 10 000 test 32×32 colour images of 10 classes.

    Files: ``root/cifar-10-batches-py/`` (the python version's pickled batches). Augmentation (Huang et al.,
    DenseNet): ``RandomCrop(32, padding=4)`` and ``RandomHorizontalFlip``. Options: see the module docstring.
    """
    return _build(
        _CIFAR10, partial(_cifar, hundred=False), augment=augment, root=root, download=download, normalize=normalize
    )


@register_dataset("cifar100")
def cifar100(*, augment: bool = True, root: Root = "data", download: bool = False, normalize: bool = True) -> Source:
    """CIFAR-100: 50 000 training and 10 000 test 32×32 colour images of 100 (fine) classes.

    Files: ``root/cifar-100-python/``. Augmentation as CIFAR-10's. Options: see the module docstring.
    """
    return _build(
        _CIFAR100, partial(_cifar, hundred=True), augment=augment, root=root, download=download, normalize=normalize
    )


@register_dataset("svhn")
def svhn(*, augment: bool = True, root: Root = "data", download: bool = False, normalize: bool = True) -> Source:
    """SVHN: 73 257 training and 26 032 test 32×32 house-number digits (the ``extra`` split is not used).

    Files: ``root/train_32x32.mat`` and ``root/test_32x32.mat`` (directly in ``root``, as torchvision keeps
    them). The digit 0, labelled 10 in the files, is class 0. Augmentation: ``RandomCrop(32, padding=4)``, no
    flip. Options: see the module docstring.
    """
    return _build(_SVHN, _svhn, augment=augment, root=root, download=download, normalize=normalize)


@register_dataset("stl10")
def stl10(*, augment: bool = True, root: Root = "data", download: bool = False, normalize: bool = True) -> Source:
    """STL-10: the 5 000 labelled training and 8 000 test 96×96 colour images of 10 classes.

    Files: ``root/stl10_binary/`` (``train_X.bin``, ``train_y.bin``, ``test_X.bin``, ``test_y.bin``; the
    unlabelled split is not needed). Labels 1 … 10 in the files become 0 … 9. Augmentation:
    ``RandomCrop(96, padding=12)`` and ``RandomHorizontalFlip``. Options: see the module docstring.
    """
    return _build(_STL10, _stl10, augment=augment, root=root, download=download, normalize=normalize)


@register_dataset("mnist")
def mnist(*, augment: bool = True, root: Root = "data", download: bool = False, normalize: bool = True) -> Source:
    """MNIST: 60 000 training and 10 000 test 28×28 handwritten digits.

    Files: ``root/MNIST/raw/`` (the four idx-ubyte files, uncompressed). Augmentation:
    ``RandomCrop(28, padding=2)``. Options: see the module docstring.
    """
    return _build(_MNIST, _mnist, augment=augment, root=root, download=download, normalize=normalize)


@register_dataset("emnist_letters")
def emnist_letters(
    *, augment: bool = True, root: Root = "data", download: bool = False, normalize: bool = True
) -> Source:
    """EMNIST letters: 124 800 training and 20 800 test 28×28 handwritten letters, 26 classes (a/A … z/Z).

    Files: ``root/EMNIST/raw/emnist-letters-*-ubyte`` (uncompressed). Labels 1 … 26 in the files become
    0 … 25, and images are transposed upright (the files store them transposed). Augmentation:
    ``RandomCrop(28, padding=2)``. Options: see the module docstring.
    """
    return _build(
        _EMNIST_LETTERS,
        partial(_emnist, split="letters"),
        augment=augment,
        root=root,
        download=download,
        normalize=normalize,
    )


@register_dataset("emnist_digits")
def emnist_digits(
    *, augment: bool = True, root: Root = "data", download: bool = False, normalize: bool = True
) -> Source:
    """EMNIST digits: 240 000 training and 40 000 test 28×28 handwritten digits.

    Files: ``root/EMNIST/raw/emnist-digits-*-ubyte`` (uncompressed). Images are transposed upright as for
    ``emnist_letters``. Augmentation: ``RandomCrop(28, padding=2)``. Options: see the module docstring.
    """
    return _build(
        _EMNIST_DIGITS,
        partial(_emnist, split="digits"),
        augment=augment,
        root=root,
        download=download,
        normalize=normalize,
    )
