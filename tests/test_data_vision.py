"""The torchvision datasets, read from tiny files written in each dataset's real on-disk format.

Each fixture writes a dozen random images per split the way the official release stores them (CIFAR's pickled
batches, SVHN's .mat, MNIST/EMNIST idx files, STL-10's column-major binaries), so the tests catch transposes,
channel orders, label offsets and augmentation leaking into evaluation splits, all without a network.

CIFAR's batches are pickles, which graftnet unpickles only when their md5 is the one in torchvision's list for the
official release. The tiny fixtures are not that release, so an autouse fixture points torchvision's lists at the
fixtures' own digests (the same bytes in every test: the images are seeded); any other bytes, a planted pickle
included, are refused exactly as a real run refuses them.
"""

from __future__ import annotations

import ast
import hashlib
import os
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


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()


_CIFAR_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}


@pytest.fixture(scope="session")
def fixture_md5s(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, str]]:
    """{dataset: {file name: md5}} of every pickle the CIFAR writers make."""
    sums = {}
    for name, folder in _CIFAR_FOLDERS.items():
        root = tmp_path_factory.mktemp(name)
        _write(name, root)
        sums[name] = {f.name: _md5(f) for f in (root / folder).iterdir()}
    return sums


@pytest.fixture(autouse=True)
def official_release_is_the_fixture(monkeypatch: pytest.MonkeyPatch, fixture_md5s: dict[str, dict[str, str]]) -> None:
    """torchvision's CIFAR md5 lists, with each digest replaced by the fixture file's (restored after each test)."""
    from torchvision import datasets

    for cls, name in ((datasets.CIFAR10, "cifar10"), (datasets.CIFAR100, "cifar100")):
        sums = fixture_md5s[name]
        monkeypatch.setattr(cls, "train_list", [[f, sums[f]] for f, _ in cls.train_list])
        monkeypatch.setattr(cls, "test_list", [[f, sums[f]] for f, _ in cls.test_list])
        monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": sums[cls.meta["filename"]]})


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


def test_unreadable_file_is_a_data_error_with_its_cause(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from torchvision import datasets

    _write("cifar10", tmp_path)
    garbage = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    garbage.write_bytes(b"not a pickle")
    # Listed as official, so it gets past the checksum to the unpickler, whose error must come out as a DataError.
    listed = [[f, _md5(garbage) if f == garbage.name else md5] for f, md5 in datasets.CIFAR10.train_list]
    monkeypatch.setattr(datasets.CIFAR10, "train_list", listed)
    with pytest.raises(
        DataError, match=r"cifar10: could not read the dataset under .*data\.kwargs\.download: true"
    ) as info:
        make_splits("cifar10", {"root": str(tmp_path)})
    assert isinstance(info.value.__cause__, pickle.UnpicklingError)


def test_unreadable_mat_file_is_a_data_error_with_its_cause(tmp_path: Path) -> None:
    _write("svhn", tmp_path)
    (tmp_path / "test_32x32.mat").write_bytes(b"not a MATLAB file")
    with pytest.raises(DataError, match=r"svhn: could not read the dataset under") as info:
        make_splits("svhn", {"root": str(tmp_path)})
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


class _Planted:
    """Unpickling it opens ``marker`` for writing, creating the file: any command could run the same way."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return open, (self.marker, "w")


def _plant(path: Path, marker: Path) -> bytes:
    payload = pickle.dumps(_Planted(marker), protocol=2)
    path.write_bytes(payload)
    return payload


def test_the_planted_payload_runs_when_unpickled(tmp_path: Path) -> None:
    """The probe is live: unpickling what the tests below plant does create the marker."""
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(_Planted(marker))).close()
    assert marker.exists()


@pytest.mark.parametrize(
    ("name", "file"),
    [("cifar10", "data_batch_1"), ("cifar10", "batches.meta"), ("cifar100", "train"), ("cifar100", "meta")],
)
def test_planted_pickle_is_refused_before_anything_unpickles_it(
    name: str, file: str, tmp_path: Path, fixture_md5s: dict[str, dict[str, str]]
) -> None:
    root, marker = tmp_path / "data", tmp_path / "ran"
    _write(name, root)
    planted = root / _CIFAR_FOLDERS[name] / file
    found = hashlib.md5(_plant(planted, marker), usedforsecurity=False).hexdigest()
    with pytest.raises(DataError) as info:
        make_splits(name, {"root": str(root), "download": False})
    assert not marker.exists(), "the planted pickle was unpickled"
    message = str(info.value)
    assert str(planted) in message and found in message and fixture_md5s[name][file] in message
    assert "pickle" in message and "arbitrary code" in message
    assert "remove the file" in message and "data.kwargs.download: true" in message and "data.kwargs.root" in message
    assert info.value.__cause__ is None  # refused by graftnet's check, not a wrapped unpickling error


def test_torchvisions_own_md5_list_is_the_reference(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With torchvision's real lists, files that are not the official release (the tiny fixtures) are refused."""
    monkeypatch.undo()  # drops the autouse fixture's stand-in digests
    from torchvision import datasets

    _write("cifar10", tmp_path)
    first, official = datasets.CIFAR10.train_list[0]
    with pytest.raises(DataError, match=rf"refusing to read .*{first}.*{official}"):
        make_splits("cifar10", {"root": str(tmp_path)})


def test_relative_root_is_named_in_the_refusal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write("cifar10", tmp_path)
    _plant(tmp_path / "cifar-10-batches-py" / "test_batch", tmp_path / "ran")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=r"test_batch \(dataset folder .* \(data\.kwargs\.root '\.'\)\)"):
        make_splits("cifar10", {"root": "."})
    assert not (tmp_path / "ran").exists()


def test_download_replaces_a_planted_pickle_with_the_official_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torchvision import datasets
    from torchvision.datasets import utils

    root, marker, fetched = tmp_path / "data", tmp_path / "ran", tmp_path / "fetched"
    train, _ = _write("cifar10", root)
    _plant(root / "cifar-10-batches-py" / "data_batch_1", marker)
    _write("cifar10", fetched)  # what the (faked) official archive extracts to
    calls = []

    def download(url: str, download_root: str, **kwargs: object) -> None:
        calls.append(url)
        for f in (fetched / "cifar-10-batches-py").iterdir():
            (Path(download_root) / "cifar-10-batches-py" / f.name).write_bytes(f.read_bytes())

    monkeypatch.setattr(utils, "download_and_extract_archive", download)
    source = DATASETS.get("cifar10")(root=root, download=True)
    assert calls == [datasets.CIFAR10.url] and not marker.exists()
    assert source.train_targets.tolist() == train.y.tolist()
    DATASETS.get("cifar10")(root=root, download=True)  # every file now matches: nothing is fetched again
    assert len(calls) == 1


def test_download_that_leaves_a_wrong_pickle_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from torchvision.datasets import utils

    marker = tmp_path / "ran"
    _write("cifar100", tmp_path)
    _plant(tmp_path / "cifar-100-python" / "meta", marker)
    monkeypatch.setattr(utils, "download_and_extract_archive", lambda *args, **kwargs: None)
    with pytest.raises(DataError, match=r"cifar100: refusing to read .*meta"):
        make_splits("cifar100", {"root": str(tmp_path), "download": True})
    assert not marker.exists()


def test_each_pickle_is_hashed_once_per_process_until_it_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write("cifar10", tmp_path)
    hashed: list[str] = []
    real = vision._hash_file

    def counting(path: Path) -> str:
        hashed.append(path.name)
        return real(path)

    monkeypatch.setattr(vision, "_hash_file", counting)
    for _ in range(3):
        make_splits("cifar10", {"root": str(tmp_path)}, val_size=N_VAL)
    assert sorted(hashed) == sorted(f.name for f in (tmp_path / "cifar-10-batches-py").iterdir())
    # The same size and, set back, the same modification time: the change time still tells the rewrite apart.
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    before = batch.stat()
    data = bytearray(batch.read_bytes())
    data[len(data) // 2] ^= 0xFF
    batch.write_bytes(bytes(data))
    os.utime(batch, ns=(before.st_atime_ns, before.st_mtime_ns))
    with pytest.raises(DataError, match="refusing to read .*data_batch_2"):
        make_splits("cifar10", {"root": str(tmp_path)}, val_size=N_VAL)
    assert hashed.count("data_batch_2") == 2


@pytest.mark.parametrize("name", ["mnist", "emnist_letters"])
def test_legacy_processed_files_are_never_loaded(name: str, tmp_path: Path) -> None:
    """torchvision prefers MNIST/EMNIST's old ``processed/*.pt`` (``torch.load``) to raw/; graftnet reads raw/ only."""
    from torchvision import datasets

    root, marker = tmp_path / "data", tmp_path / "ran"
    _, test = _write(name, root)
    cls = datasets.MNIST if name == "mnist" else datasets.EMNIST
    probe = cls.__new__(cls)  # where this torchvision looks for the legacy files
    probe.root = str(root)
    if cls is datasets.EMNIST:
        probe.training_file, probe.test_file = cls._training_file("letters"), cls._test_file("letters")
    processed = Path(probe.processed_folder)
    processed.mkdir(parents=True)
    for file in (probe.training_file, probe.test_file):
        _plant(processed / file, marker)
    assert probe._check_legacy_exist(), "planted where torchvision would load it"
    source = DATASETS.get(name)(root=root, download=False)
    assert not marker.exists()
    assert source.test_targets is not None and source.test_targets.tolist() == test.y.tolist()
