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

Checksums and pickles: the CIFAR-10 and CIFAR-100 files are Python pickles, and unpickling a file can run any
code its author chose, so graftnet itself checks every one of them (CIFAR-10's ``data_batch_1`` … ``data_batch_5``,
``test_batch`` and ``batches.meta``; CIFAR-100's ``train``, ``test`` and ``meta``) against the md5 sums in
torchvision's own lists (``CIFAR10.train_list``, ``test_list`` and ``meta``, and CIFAR100's) before anything
unpickles them, with ``download`` on or off. A file whose md5 differs is refused with a
:class:`~graftnet.errors.DataError` naming the file and both digests: only the byte-exact official release is
ever unpickled, and there is no option to unpickle anything else (md5 is broken for collisions, not for matching
a digest someone else published, which is what a planted file would need). Each file is hashed once per process:
the digest is kept for as long as its path, device, inode, size, modification and change times stay the same.

The other datasets are not pickles and are parsed as data by torchvision, without the md5 check it would
otherwise repeat on every open: SVHN's ``.mat`` files through ``scipy.io.loadmat`` (MATLAB arrays, which cannot
carry code), STL-10's ``.bin`` and MNIST/EMNIST's idx ``-ubyte`` files as raw bytes. torchvision's md5 list for
those would reject any copy that is not byte-exact (re-packed mirrors, the tiny fixtures the tests write), rehash
hundreds of MB on every run, and for STL-10 demand the 2.6 GB unlabelled split these builders never read, so with
``download=False`` they only have to be present and parse (a wrong or truncated file still fails loudly, as a
``DataError``, when its arrays or labels come out wrong); with ``download=True`` torchvision's checksums decide
whether to fetch a file again. MNIST and EMNIST are always read from ``raw/``: torchvision's legacy
``processed/*.pt`` files (loaded with ``torch.load``) are never opened, whatever is there.

Examples:
    >>> from graftnet.data import make_splits
    >>> s = make_splits("cifar10", {"root": "data"}, val_size=5000)  # doctest: +SKIP
    >>> s.train[0][0].shape, s.num_classes  # doctest: +SKIP
    (torch.Size([3, 32, 32]), 10)
"""

from __future__ import annotations

import hashlib
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


class _UnofficialFileError(Exception):
    """A pickled file whose md5 is not the official one; :func:`_build` turns it into a :class:`DataError`."""

    def __init__(self, file: Path, expected: str, found: str) -> None:
        super().__init__(f"{file}: md5 {found}, expected {expected}")
        self.file, self.expected, self.found = file, expected, found


_MD5S: dict[tuple[str, int, int, int, int, int], str] = {}  # (path, st_dev, st_ino, size, mtime_ns, ctime_ns) -> md5


def _hash_file(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)  # torchvision publishes md5 sums; see the module docstring
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _md5(path: Path) -> str:
    """``path``'s md5, hashed once per process for as long as the file's identity, size and times are unchanged.

    The change time is in the key as well as the modification time: ``os.utime`` can set the latter back after
    rewriting a file, not the former.
    """
    st = path.stat()
    key = (str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if key not in _MD5S:
        _MD5S[key] = _hash_file(path)
    return _MD5S[key]


def _pickled_files(stock: Any) -> list[tuple[str, str]]:
    """(file name, official md5) for every pickle torchvision's CIFAR class ``stock`` unpickles, from its lists."""
    entries = [*stock.train_list, *stock.test_list, [stock.meta["filename"], stock.meta["md5"]]]
    return [(str(name), str(md5)) for name, md5 in entries]


def _first_unofficial(stock: Any, folder: Path) -> _UnofficialFileError | None:
    for name, expected in _pickled_files(stock):
        file = folder / name
        found = _md5(file) if file.is_file() else "absent"
        if found != expected:
            return _UnofficialFileError(file, expected, found)
    return None


def _cifar(root: str, download: bool, *, hundred: bool) -> tuple[_Split, _Split]:
    from torchvision import datasets

    stock = datasets.CIFAR100 if hundred else datasets.CIFAR10
    folder = Path(root) / stock.base_folder
    # Every pickle is checked against torchvision's md5 list before anything unpickles it (module docstring).
    unofficial = _first_unofficial(stock, folder)
    if unofficial is not None and download:  # as torchvision's download(): fetch the archive unless all files match
        from torchvision.datasets.utils import download_and_extract_archive

        download_and_extract_archive(stock.url, root, filename=stock.filename, md5=stock.tgz_md5)
        unofficial = _first_unofficial(stock, folder)
    if unofficial is not None:
        raise unofficial
    # Verified just above, so torchvision need not hash the same files again: it only asks that they exist.
    verified = _without_md5(
        stock,
        train_list=_no_md5(stock.train_list),
        test_list=_no_md5(stock.test_list),
        meta={**stock.meta, "md5": None},
    )
    train, test = verified(root, train=True), verified(root, train=False)
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


def _raw_only(cls: type) -> type:
    """``cls`` (MNIST or EMNIST) that never looks at torchvision's legacy ``processed/*.pt`` files.

    torchvision prefers those files when both exist and reads them with ``torch.load`` (some of its versions
    without ``weights_only=True``, which unpickles arbitrary objects). The subclass keeps ``cls``'s name, since
    torchvision derives the ``root/<name>/raw`` folder from it, and reads the idx files there as plain bytes.
    """

    def _check_legacy_exist(self: Any) -> bool:
        return False

    return type(cls.__name__, (cls,), {"_check_legacy_exist": _check_legacy_exist})


def _mnist(root: str, download: bool) -> tuple[_Split, _Split]:
    from torchvision import datasets

    cls = _raw_only(datasets.MNIST)
    train = cls(root, train=True, download=download)  # fetches all four files
    test = cls(root, train=False)
    return _Split(train.data.numpy(), train.targets), _Split(test.data.numpy(), test.targets)


def _emnist(root: str, download: bool, *, split: str) -> tuple[_Split, _Split]:
    from torchvision import datasets

    cls = _raw_only(datasets.EMNIST)
    train = cls(root, split=split, train=True, download=download)  # one archive holds every split
    test = cls(root, split=split, train=False)
    offset = 1 if split == "letters" else 0  # letters are labelled 1 … 26 (0 is an unused "N/A" class)
    # EMNIST's files store each image transposed (NIST's column-major conversion) and torchvision serves them
    # as stored; swapping H and W makes characters upright, as MNIST's are, so flips and crops mean the same.
    return (
        _Split(train.data.transpose(1, 2).numpy(), train.targets - offset),
        _Split(test.data.transpose(1, 2).numpy(), test.targets - offset),
    )


def _resolve(root: Root) -> Path:
    return Path(root).expanduser().absolute()


def _where(root: Root, path: Path) -> str:
    return f"{path}" if Path(root).expanduser().is_absolute() else f"{path} (data.kwargs.root {str(root)!r})"


def _refusal(info: _Info, e: _UnofficialFileError, where: str) -> DataError:
    if e.found == "absent":
        found = "the file is absent"
    else:
        found = f"its md5 is {e.found}, but the official release's is {e.expected} (torchvision's checksum list)"
    return DataError(
        f"{info.name}: refusing to read {e.file} (dataset folder {where}): {found}. The {info.name} files are "
        f"Python pickles, and unpickling a file can run arbitrary code, so graftnet unpickles only the byte-exact "
        f"official files. Fix: remove the file (if you did not put it there, treat it as hostile) and fetch the "
        f"official release with data.kwargs.download: true, on a machine with internet if this one has none "
        f"(then copy the folder {e.file.parent.name}/ here), or point data.kwargs.root at a verified copy."
    )


def _require_files(info: _Info, root: Root, path: Path) -> None:
    missing = [f for f in info.files if not (path / f).is_file()]
    if not missing:
        return
    where = _where(root, path)
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
    except _UnofficialFileError as e:
        raise _refusal(info, e, _where(root, path)) from None
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

    Files: ``root/cifar-10-batches-py/`` (the python version's pickled batches, each checked against
    torchvision's md5 sums before it is unpickled). Augmentation (Huang et al., DenseNet):
    ``RandomCrop(32, padding=4)`` and ``RandomHorizontalFlip``. Options: see the module docstring.
    """
    return _build(
        _CIFAR10, partial(_cifar, hundred=False), augment=augment, root=root, download=download, normalize=normalize
    )


@register_dataset("cifar100")
def cifar100(*, augment: bool = True, root: Root = "data", download: bool = False, normalize: bool = True) -> Source:
    """CIFAR-100: 50 000 training and 10 000 test 32×32 colour images of 100 (fine) classes.

    Files: ``root/cifar-100-python/`` (pickles, checked as CIFAR-10's). Augmentation as CIFAR-10's. Options:
    see the module docstring.
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
