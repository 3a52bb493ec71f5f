"""The torchvision datasets, read from tiny files written in each dataset's real on-disk format.

Each fixture writes a dozen random images per split the way the official release stores them (CIFAR's pickled
batches, SVHN's .mat, MNIST/EMNIST idx files, STL-10's column-major binaries), so the tests catch transposes,
channel orders, label offsets and augmentation leaking into evaluation splits, all without a network.
"""

from __future__ import annotations

import ast
import pickle
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

import graftnet.data._vision as vision
from graftnet.data import DATASETS, Relabeled, batches, make_splits
from graftnet.errors import DataError

N_TRAIN, N_TEST, N_VAL = 12, 6, 4


@dataclass(frozen=True)
class Images:
    """Upright images, (N, H, W) or (N, H, W, C) uint8, with their labels as the builder should return them."""

    x: np.ndarray
    y: np.ndarray


Writer = Callable[[Path, Images, Images], None]


def _pickle(path: Path, obj: object) -> None:
    path.write_bytes(pickle.dumps(obj, protocol=2))


def _cifar_rows(images: Images) -> np.ndarray:
    return images.x.transpose(0, 3, 1, 2).reshape(len(images.x), -1)  # each row: R plane, G plane, B plane


def write_cifar10(root: Path, train: Images, test: Images) -> None:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for k, idx in enumerate(np.array_split(np.arange(len(train.x)), 5), start=1):
        part = Images(train.x[idx], train.y[idx])
        _pickle(
            folder / f"data_batch_{k}",
            {"batch_label": f"training batch {k} of 5", "labels": part.y.tolist(), "data": _cifar_rows(part)},
        )
    _pickle(
        folder / "test_batch",
        {"batch_label": "testing batch 1 of 1", "labels": test.y.tolist(), "data": _cifar_rows(test)},
    )
    _pickle(folder / "batches.meta", {"label_names": [f"class{i}" for i in range(10)], "num_vis": 3072})


def write_cifar100(root: Path, train: Images, test: Images) -> None:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for name, part in (("train", train), ("test", test)):
        entry = {"fine_labels": part.y.tolist(), "coarse_labels": (part.y // 5).tolist(), "data": _cifar_rows(part)}
        _pickle(folder / name, entry)
    _pickle(
        folder / "meta",
        {"fine_label_names": [f"f{i}" for i in range(100)], "coarse_label_names": [f"c{i}" for i in range(20)]},
    )


def write_svhn(root: Path, train: Images, test: Images) -> None:
    from scipy.io import savemat

    root.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", train), ("test", test)):
        y = np.where(part.y == 0, 10, part.y).astype(np.uint8).reshape(-1, 1)  # SVHN labels the digit 0 as 10
        savemat(root / f"{name}_32x32.mat", {"X": part.x.transpose(1, 2, 3, 0), "y": y})  # X is (H, W, C, N)


def _idx(path: Path, array: np.ndarray) -> None:
    """An idx-ubyte file: magic 0x0000 08 ndim (uint8), big-endian dimensions, then the bytes."""
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def write_mnist(root: Path, train: Images, test: Images) -> None:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, part in (("train", train), ("t10k", test)):
        _idx(raw / f"{prefix}-images-idx3-ubyte", part.x)
        _idx(raw / f"{prefix}-labels-idx1-ubyte", part.y)


def _write_emnist(split: str, offset: int) -> Writer:
    def write(root: Path, train: Images, test: Images) -> None:
        raw = root / "EMNIST" / "raw"
        raw.mkdir(parents=True)
        for part_name, part in (("train", train), ("test", test)):
            _idx(raw / f"emnist-{split}-{part_name}-images-idx3-ubyte", part.x.transpose(0, 2, 1))  # stored transposed
            _idx(raw / f"emnist-{split}-{part_name}-labels-idx1-ubyte", part.y + offset)

    return write


def write_stl10(root: Path, train: Images, test: Images) -> None:
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    for name, part in (("train", train), ("test", test)):
        # Each channel column-major: the bytes run (N, C, W, H). Labels are 1-based.
        (folder / f"{name}_X.bin").write_bytes(np.ascontiguousarray(part.x.transpose(0, 3, 2, 1)).tobytes())
        (folder / f"{name}_y.bin").write_bytes((part.y + 1).astype(np.uint8).tobytes())


@dataclass(frozen=True)
class Case:
    write: Writer
    shape: tuple[int, int, int]  # (C, H, W)
    num_classes: int
    padding: int
    flip: bool
    expected_file: str  # a path the missing-files error must name


CASES = {
    "cifar10": Case(write_cifar10, (3, 32, 32), 10, 4, True, "cifar-10-batches-py/data_batch_1"),
    "cifar100": Case(write_cifar100, (3, 32, 32), 100, 4, True, "cifar-100-python/train"),
    "svhn": Case(write_svhn, (3, 32, 32), 10, 4, False, "train_32x32.mat"),
    "mnist": Case(write_mnist, (1, 28, 28), 10, 2, False, "MNIST/raw/train-images-idx3-ubyte"),
    "emnist_letters": Case(_write_emnist("letters", 1), (1, 28, 28), 26, 2, False, "EMNIST/raw/emnist-letters-train"),
    "emnist_digits": Case(_write_emnist("digits", 0), (1, 28, 28), 10, 2, False, "EMNIST/raw/emnist-digits-test"),
    "stl10": Case(write_stl10, (3, 96, 96), 10, 12, True, "stl10_binary/train_X.bin"),
}
NAMES = list(CASES)


def _images(case: Case, n: int, seed: int) -> Images:
    rng = np.random.default_rng(seed)
    c, h, w = case.shape
    x = rng.integers(0, 256, (n, h, w) if c == 1 else (n, h, w, c), dtype=np.uint8)
    # The first and last classes (where label offsets go wrong: SVHN's 10, EMNIST's 1 … 26, STL-10's 1 … 10) and two
    # between them, so a class subset has something to leave out.
    labels = np.array([0, case.num_classes - 1, 1, 2])
    return Images(x, labels[np.arange(n) % len(labels)])


def _write(name: str, root: Path) -> tuple[Images, Images]:
    case = CASES[name]
    train, test = _images(case, N_TRAIN, seed=1), _images(case, N_TEST, seed=2)
    case.write(root, train, test)
    return train, test


def _tensor(image: np.ndarray) -> torch.Tensor:
    """What ToTensor makes of an upright uint8 image: (C, H, W) float32 in [0, 1]."""
    t = torch.from_numpy(image)
    return (t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1)).float().div(255)


def test_all_registered() -> None:
    assert set(NAMES) <= set(DATASETS.keys())


@pytest.mark.parametrize("name", NAMES)
def test_reads_pixels_and_labels_where_they_were_written(name: str, tmp_path: Path) -> None:
    train, test = _write(name, tmp_path)
    case = CASES[name]
    s = make_splits(name, {"root": str(tmp_path), "normalize": False}, val_size=N_VAL)
    assert (len(s.train), len(s.val), len(s.test)) == (N_TRAIN - N_VAL, N_VAL, N_TEST)
    assert s.num_classes == case.num_classes and s.input_shape == case.shape
    for i in range(N_TEST):
        x, y = s.test[i]
        assert x.dtype == torch.float32 and x.shape == case.shape and type(y) is int
        assert torch.equal(x, _tensor(test.x[i])), f"test image {i} differs (transposed or channels mixed?)"
        assert y == test.y[i]
    assert isinstance(s.val, Relabeled)
    for j, original in enumerate(s.val.indices):
        x, y = s.val[j]
        assert torch.equal(x, _tensor(train.x[original])) and y == train.y[original]
    x, y = next(batches(s.val, N_VAL))  # through a DataLoader, after a pickle round trip as spawned workers do it
    assert x.shape == (N_VAL, *case.shape) and y.dtype == torch.long
    assert torch.equal(pickle.loads(pickle.dumps(s.val))[0][0], s.val[0][0])


def _explain(augmented: torch.Tensor, plain: torch.Tensor, padding: int) -> tuple[int, int, bool] | None:
    """The (dy, dx, flipped) that turns ``plain`` into ``augmented`` by a zero-padded crop and a flip, if any."""
    _, h, w = plain.shape
    padded = torch.nn.functional.pad(plain, (padding,) * 4)
    for dy in range(2 * padding + 1):
        for dx in range(2 * padding + 1):
            crop = padded[:, dy : dy + h, dx : dx + w]
            for flipped in (False, True):
                if torch.equal(augmented, crop.flip(-1) if flipped else crop):
                    return dy - padding, dx - padding, flipped
    return None


@pytest.mark.parametrize("name", NAMES)
def test_augmentation_is_the_standard_one_and_only_on_train(name: str, tmp_path: Path) -> None:
    train, _ = _write(name, tmp_path)
    case = CASES[name]
    s = make_splits(name, {"root": str(tmp_path), "normalize": False}, val_size=N_VAL)
    assert isinstance(s.train, Relabeled)
    plain = _tensor(train.x[s.train.indices[0]])
    moves = [_explain(s.train[0][0], plain, case.padding) for _ in range(16)]
    assert None not in moves, "a training read is not a padded crop (plus flip) of the image"
    assert len(set(moves)) > 1, "training reads never change: augmentation is off"
    assert any(m[2] for m in moves if m) == case.flip  # flips for CIFAR and STL-10, never for digits
    for split in (s.val, s.test):
        assert torch.equal(split[0][0], split[0][0])
    off = make_splits(name, {"root": str(tmp_path), "normalize": False}, val_size=N_VAL, augment=False)
    assert torch.equal(off.train[0][0], plain) and torch.equal(off.train[0][0], plain)
    source = DATASETS.get(name)(augment=False, root=str(tmp_path), normalize=False)
    assert torch.equal(source.train[0][0], _tensor(train.x[0])) and torch.equal(source.train[0][0], _tensor(train.x[0]))


@pytest.mark.parametrize("name", NAMES)
def test_targets_come_in_order_as_int64(name: str, tmp_path: Path) -> None:
    train, test = _write(name, tmp_path)
    source = DATASETS.get(name)(root=tmp_path)  # a Path works as well as a str
    assert source.train_targets.dtype == torch.long and source.test_targets.dtype == torch.long
    assert source.train_targets.tolist() == train.y.tolist() and source.test_targets.tolist() == test.y.tolist()
    assert [source.train_eval[i][1] for i in range(N_TRAIN)] == train.y.tolist()


@pytest.mark.parametrize("name", NAMES)
def test_class_subset_relabels_in_listed_order(name: str, tmp_path: Path) -> None:
    _, test = _write(name, tmp_path)
    last = CASES[name].num_classes - 1
    s = make_splits(name, {"root": str(tmp_path), "normalize": False}, classes=[last, 0], val_size=2)
    assert s.num_classes == 2
    kept = [i for i in range(N_TEST) if test.y[i] in (last, 0)]
    assert len(s.test) == len(kept) and len(s.train) + len(s.val) == 2 * N_TRAIN // 4
    for j, i in enumerate(kept):
        x, y = s.test[j]
        assert torch.equal(x, _tensor(test.x[i])) and y == (0 if test.y[i] == last else 1)
    assert {s.train[i][1] for i in range(len(s.train))} | {s.val[i][1] for i in range(len(s.val))} == {0, 1}


@pytest.mark.parametrize("name", ["cifar10", "mnist"])
def test_normalize_uses_the_dataset_statistics(name: str, tmp_path: Path) -> None:
    _write(name, tmp_path)
    mean, std = {"cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)), "mnist": ((0.1307,), (0.3081,))}[name]
    raw = make_splits(name, {"root": str(tmp_path), "normalize": False}, val_size=N_VAL).test[0][0]
    normed = make_splits(name, {"root": str(tmp_path)}, val_size=N_VAL).test[0][0]
    expected = (raw - torch.tensor(mean).view(-1, 1, 1)) / torch.tensor(std).view(-1, 1, 1)
    torch.testing.assert_close(normed, expected)


@pytest.mark.parametrize("name", NAMES)
def test_missing_files_raise_before_torchvision_runs(name: str, tmp_path: Path) -> None:
    root = tmp_path / "absent"
    with pytest.raises(DataError) as info:
        make_splits(name, {"root": str(root)})
    message = str(info.value)
    assert name in message and str(root) in message and CASES[name].expected_file in message
    assert "data.kwargs.download: true" in message and "data.kwargs.root" in message
    assert info.value.__cause__ is None  # our own check, not a wrapped torchvision error


def test_missing_files_error_names_the_relative_root_and_only_what_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write("cifar10", tmp_path)
    (tmp_path / "cifar-10-batches-py" / "test_batch").unlink()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=r"missing: cifar-10-batches-py/test_batch\)") as info:
        make_splits("cifar10", {"root": "."})
    assert f"{tmp_path} (data.kwargs.root '.')" in str(info.value)


def test_unreadable_file_is_a_data_error_with_its_cause(tmp_path: Path) -> None:
    _write("cifar10", tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(
        DataError, match=r"cifar10: could not read the dataset under .*data\.kwargs\.download: true"
    ) as info:
        make_splits("cifar10", {"root": str(tmp_path)})
    assert info.value.__cause__ is not None


def test_truncated_images_are_a_data_error(tmp_path: Path) -> None:
    _write("stl10", tmp_path)
    path = tmp_path / "stl10_binary" / "test_X.bin"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match="stl10: could not read") as info:
        make_splits("stl10", {"root": str(tmp_path)})
    assert isinstance(info.value.__cause__, ValueError)


@pytest.mark.parametrize(
    ("name", "path", "bad"),
    [
        ("stl10", "stl10_binary/train_y.bin", 0),
        ("emnist_letters", "EMNIST/raw/emnist-letters-test-labels-idx1-ubyte", 0),
    ],
)
def test_labels_outside_the_classes_are_a_data_error(name: str, path: str, bad: int, tmp_path: Path) -> None:
    _write(name, tmp_path)
    file = tmp_path / path
    data = bytearray(file.read_bytes())
    data[-1] = bad  # 1-based files: 0 is no class (STL-10 would wrap it to 255, EMNIST letters to -1)
    file.write_bytes(bytes(data))
    with pytest.raises(DataError, match=rf"{name}'s .* split under .*: labels run from"):
        make_splits(name, {"root": str(tmp_path)})


def test_torchvision_is_imported_lazily() -> None:
    tree = ast.parse(Path(vision.__file__).read_text())
    top = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
    names = {a.name for n in top if isinstance(n, ast.Import) for a in n.names} | {
        n.module or "" for n in top if isinstance(n, ast.ImportFrom)
    }
    assert not {m for m in names if m.split(".")[0] in {"torchvision", "PIL", "scipy"}}
