"""The user's own data: the ``imagefolder`` dataset and ``package.module:callable`` dataset references.

Image folders are written with PIL into tmp_path (a few 8×8 PNGs per class), each image different, so a sample
can be traced back to its file; dataset references are modules written into tmp_path and put on sys.path.
"""

from __future__ import annotations

import importlib
import itertools
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import Subset

from graftnet.data import DATASETS, Splits, TensorData, make_splits, task_splits
from graftnet.errors import DataError, SpecError
from graftnet.spec import DataSpec, Spec

# Deliberately not created in sorted order: class numbers must follow the sorted names, as ImageFolder's do.
CLASSES = ("dog", "cat", "eel")
SORTED = sorted(CLASSES)
_serial = itertools.count()


def _pixels(seed: int, h: int = 8, w: int = 8) -> np.ndarray:
    """An (h, w, 3) uint8 image unique to ``seed`` and asymmetric left to right, so a flip changes it."""
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    channels = [(seed * 7 + 3 * c + 20 * cols + rows) % 256 for c in range(3)]
    return np.stack(channels, axis=-1).astype(np.uint8)


def _write(path: Path, pixels: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def _tensor(pixels: np.ndarray) -> torch.Tensor:
    """What ToTensor makes of ``pixels``: (C, H, W) float in [0, 1]."""
    return torch.from_numpy(pixels).permute(2, 0, 1).float() / 255.0


def image_root(
    root: Path, counts: dict[str, int] | None = None, classes: tuple[str, ...] = CLASSES
) -> dict[str, list[tuple[Path, np.ndarray, int]]]:
    """Write ``root/<split>/<class>/<i>.png`` (``counts`` images per class and split); return, per split, each
    image's path, pixels and expected label, in ImageFolder's order (sorted class, then sorted file)."""
    counts = {"train": 4, "val": 2, "test": 2} if counts is None else counts
    files: dict[str, list[tuple[Path, np.ndarray, int]]] = {}
    for split, n in counts.items():
        for name in classes:
            for i in range(n):
                pixels = _pixels(next(_serial))
                _write(root / split / name / f"{i}.png", pixels)
                files.setdefault(split, []).append((root / split / name / f"{i}.png", pixels, SORTED.index(name)))
        files[split].sort(key=lambda entry: (entry[2], entry[0].name))
    return files


def _assert_serves(dataset: Any, files: list[tuple[Path, np.ndarray, int]]) -> None:
    assert len(dataset) == len(files)
    for i, (_, pixels, label) in enumerate(files):
        x, y = dataset[i]
        assert y == label
        torch.testing.assert_close(x, _tensor(pixels), atol=1e-6, rtol=0)


# ---------------------------------------------------------------- imagefolder


def test_imagefolder_serves_the_files_with_sorted_class_numbers(tmp_path: Path) -> None:
    files = image_root(tmp_path)
    source = DATASETS.get("imagefolder")(augment=False, root=str(tmp_path))
    assert source.num_classes == 3 and source.input_shape == (3, 8, 8)
    assert source.train_targets.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert source.train_targets.dtype == torch.long
    assert source.val_targets is not None and source.val_targets.tolist() == [0, 0, 1, 1, 2, 2]
    assert source.test_targets is not None and source.test_targets.tolist() == [0, 0, 1, 1, 2, 2]
    _assert_serves(source.train_eval, files["train"])
    _assert_serves(source.train, files["train"])  # augment=False: train is the plain view
    assert source.val is not None and source.test is not None
    _assert_serves(source.val, files["val"])
    _assert_serves(source.test, files["test"])


def test_imagefolder_val_and_test_are_used_as_given(tmp_path: Path) -> None:
    files = image_root(tmp_path)
    splits = make_splits("imagefolder", {"root": tmp_path}, val_size=0.5, augment=False)  # val_size is ignored
    assert splits.num_classes == 3 and splits.input_shape == (3, 8, 8)
    _assert_serves(splits.train, files["train"])  # all 12: nothing was carved from train for validation
    _assert_serves(splits.val, files["val"])
    _assert_serves(splits.test, files["test"])


def test_imagefolder_val_and_test_keep_train_numbering_when_they_lack_a_class(tmp_path: Path) -> None:
    image_root(tmp_path, {"train": 2})
    for split in ("val", "test"):  # only "eel": ImageFolder alone would call it class 0
        _write(tmp_path / split / "eel" / "0.png", _pixels(900))
    source = DATASETS.get("imagefolder")(augment=False, root=tmp_path)
    assert source.val is not None and source.test is not None
    assert source.val[0][1] == SORTED.index("eel") == 2
    assert source.test[0][1] == 2
    assert source.val_targets is not None and source.val_targets.tolist() == [2]


def test_imagefolder_without_val_carves_it_from_train(tmp_path: Path) -> None:
    files = image_root(tmp_path, {"train": 4, "test": 2})
    splits = make_splits("imagefolder", {"root": tmp_path}, val_size=3, augment=False, seed=1)
    assert len(splits.val) == 3 and len(splits.train) == 9  # type: ignore[arg-type]
    by_pixels = {_tensor(p).numpy().tobytes(): label for _, p, label in files["train"]}
    seen = []
    for dataset in (splits.train, splits.val):
        for i in range(len(dataset)):  # type: ignore[arg-type]
            x, y = dataset[i]
            key = x.numpy().tobytes()
            assert by_pixels[key] == y
            seen.append(key)
    assert sorted(seen) == sorted(by_pixels)  # train and val partition the training images
    # Carved, so every option works: keep two classes, relabelled in the order listed.
    subset = make_splits("imagefolder", {"root": tmp_path}, classes=[2, 0], val_size=2, augment=False)
    assert subset.num_classes == 2 and subset.test is not None
    assert sorted(subset.test[i][1] for i in range(len(subset.test))) == [0, 0, 1, 1]  # type: ignore[arg-type]


def test_imagefolder_without_test_has_no_test_split(tmp_path: Path) -> None:
    image_root(tmp_path, {"train": 4, "val": 1})
    source = DATASETS.get("imagefolder")(augment=False, root=tmp_path)
    assert source.test is None and source.test_targets is None
    splits = make_splits("imagefolder", {"root": tmp_path})
    assert splits.test is None and len(splits.val) == 3  # type: ignore[arg-type]
    image_root(tmp_path / "bare", {"train": 2})  # neither val/ nor test/
    carved = make_splits("imagefolder", {"root": tmp_path / "bare"}, val_size=2)
    assert carved.test is None and len(carved.val) == 2  # type: ignore[arg-type]


def test_imagefolder_resizes_to_size_or_the_first_image(tmp_path: Path) -> None:
    _write(tmp_path / "train" / "a" / "0.png", _pixels(1, 10, 12))  # first image: h=10, w=12
    _write(tmp_path / "train" / "a" / "1.png", _pixels(2, 8, 8))
    _write(tmp_path / "train" / "b" / "0.png", _pixels(3, 5, 7))
    default = DATASETS.get("imagefolder")(augment=False, root=tmp_path)
    assert default.input_shape == (3, 10, 12)
    assert [default.train_eval[i][0].shape for i in range(3)] == [torch.Size([3, 10, 12])] * 3
    for size, shape in ((6, (6, 6)), ([6, 5], (6, 5))):
        source = DATASETS.get("imagefolder")(augment=True, root=tmp_path, size=size)
        assert source.input_shape == (3, *shape)
        for view in (source.train, source.train_eval):
            assert [view[i][0].shape for i in range(3)] == [torch.Size([3, *shape])] * 3


def test_imagefolder_grayscale_has_one_channel(tmp_path: Path) -> None:
    from PIL import Image

    files = image_root(tmp_path, {"train": 1, "test": 1})
    source = DATASETS.get("imagefolder")(augment=False, root=tmp_path, grayscale=True)
    assert source.input_shape == (1, 8, 8)
    x, _ = source.train_eval[0]
    gray = np.array(Image.open(files["train"][0][0]).convert("L"))
    torch.testing.assert_close(x, torch.from_numpy(gray).float().unsqueeze(0) / 255.0, atol=1e-6, rtol=0)
    assert source.test is not None and source.test[0][0].shape == (1, 8, 8)


def test_imagefolder_normalizes_with_mean_and_std(tmp_path: Path) -> None:
    files = image_root(tmp_path, {"train": 1})
    source = DATASETS.get("imagefolder")(augment=False, root=tmp_path, mean=[0.5, 0.25, 0.0], std=[0.5, 0.25, 2])
    expected = (_tensor(files["train"][0][1]) - torch.tensor([0.5, 0.25, 0.0]).view(3, 1, 1)) / torch.tensor(
        [0.5, 0.25, 2.0]
    ).view(3, 1, 1)
    torch.testing.assert_close(source.train_eval[0][0], expected, atol=1e-5, rtol=0)


def test_imagefolder_augments_only_train(tmp_path: Path) -> None:
    files = image_root(tmp_path, {"train": 1, "val": 1, "test": 1})
    torch.manual_seed(0)
    source = DATASETS.get("imagefolder")(augment=True, root=tmp_path)
    assert source.val is not None and source.test is not None
    plain = _tensor(files["train"][0][1])
    draws = [source.train[0][0] for _ in range(30)]
    assert any(not torch.equal(d, plain) for d in draws)  # crops and flips happen …
    assert all(d.shape == plain.shape for d in draws)
    # … and only on train: every other view serves the file as it is, every time.
    for _ in range(10):
        _assert_serves(source.train_eval, files["train"])
        _assert_serves(source.val, files["val"])
        _assert_serves(source.test, files["test"])
    splits = make_splits("imagefolder", {"root": tmp_path}, augment=False)
    assert all(torch.equal(splits.train[0][0], plain) for _ in range(30))


def test_imagefolder_augmentation_is_a_padded_crop_and_a_flip(tmp_path: Path) -> None:
    files = image_root(tmp_path, {"train": 1})
    plain = _tensor(files["train"][0][1])
    padded = torch.nn.functional.pad(plain, (1, 1, 1, 1))  # 8 // 8 = 1 pixel of zero padding
    crops = [padded[:, i : i + 8, j : j + 8] for i in range(3) for j in range(3)]
    allowed = crops + [c.flip(-1) for c in crops]
    torch.manual_seed(0)
    source = DATASETS.get("imagefolder")(augment=True, root=tmp_path)
    draws = [source.train[0][0] for _ in range(200)]
    assert all(any(torch.allclose(d, a, atol=1e-6) for a in allowed) for d in draws)
    assert any(torch.allclose(d, plain.flip(-1), atol=1e-6) for d in draws)  # flipped, not cropped
    assert any(torch.allclose(d, crops[0], atol=1e-6) for d in draws)  # cropped at the corner, not flipped


def test_imagefolder_given_val_refuses_class_options(tmp_path: Path) -> None:
    image_root(tmp_path)
    with pytest.raises(DataError, match=r"data\.classes.*imagefolder brings its own validation split"):
        make_splits("imagefolder", {"root": tmp_path}, classes=[0, 1])


def test_imagefolder_train_size_keeps_a_seeded_subset(tmp_path: Path) -> None:
    image_root(tmp_path)
    splits = make_splits("imagefolder", {"root": tmp_path}, train_size=5, seed=3, augment=False)
    assert isinstance(splits.train, Subset)
    assert splits.train.indices == torch.randperm(12, generator=torch.Generator().manual_seed(3))[:5].tolist()
    assert len(splits.val) == 6  # type: ignore[arg-type]
    with pytest.raises(DataError, match=r"data\.train_size: 13 .* only 12"):
        make_splits("imagefolder", {"root": tmp_path}, train_size=13)


def test_imagefolder_requires_root() -> None:
    with pytest.raises(DataError, match=r"data\.kwargs\.root is required"):
        make_splits("imagefolder")


def test_imagefolder_missing_root_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist") as e:
        make_splits("imagefolder", {"root": tmp_path / "nowhere"})
    assert str(tmp_path / "nowhere") in str(e.value)


def test_imagefolder_missing_train_names_the_path(tmp_path: Path) -> None:
    _write(tmp_path / "val" / "a" / "0.png", _pixels(0))
    with pytest.raises(DataError, match="has no train/ folder") as e:
        make_splits("imagefolder", {"root": tmp_path})
    assert str(tmp_path) in str(e.value)


def test_imagefolder_train_without_class_folders(tmp_path: Path) -> None:
    _write(tmp_path / "train" / "0.png", _pixels(0))  # an image, but not in a class folder
    with pytest.raises(DataError, match="holds no class folders") as e:
        make_splits("imagefolder", {"root": tmp_path})
    assert str(tmp_path / "train") in str(e.value)


def test_imagefolder_empty_class_folder_names_it(tmp_path: Path) -> None:
    image_root(tmp_path, {"train": 2})
    (tmp_path / "train" / "fox").mkdir()
    (tmp_path / "train" / "fox" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match="holds no images") as e:
        make_splits("imagefolder", {"root": tmp_path})
    assert str(tmp_path / "train" / "fox") in str(e.value)


@pytest.mark.parametrize("split", ["val", "test"])
def test_imagefolder_unknown_class_in_val_or_test(tmp_path: Path, split: str) -> None:
    image_root(tmp_path, {"train": 2})
    _write(tmp_path / split / "yak" / "0.png", _pixels(0))
    with pytest.raises(DataError, match="'yak'") as e:
        make_splits("imagefolder", {"root": tmp_path})
    assert str(tmp_path / split) in str(e.value) and str(tmp_path / "train") in str(e.value)


def test_imagefolder_val_without_images(tmp_path: Path) -> None:
    image_root(tmp_path, {"train": 2})
    (tmp_path / "val" / "cat").mkdir(parents=True)
    with pytest.raises(DataError, match="holds no images") as e:
        make_splits("imagefolder", {"root": tmp_path})
    assert str(tmp_path / "val") in str(e.value)


def test_imagefolder_unreadable_image_names_the_file(tmp_path: Path) -> None:
    image_root(tmp_path, {"train": 2})
    broken = tmp_path / "train" / "eel" / "9.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    source = DATASETS.get("imagefolder")(augment=False, root=tmp_path)  # the first image is fine: builds
    with pytest.raises(DataError, match="cannot read the image") as e:
        source.train_eval[len(source.train_eval) - 1]  # type: ignore[arg-type]
    assert str(broken) in str(e.value)
    first = tmp_path / "train" / "cat" / "0.png"
    first.write_bytes(b"garbage")  # the first image sets the default size, so now the build itself fails
    with pytest.raises(DataError, match="cannot read the image") as e:
        DATASETS.get("imagefolder")(root=tmp_path)
    assert str(first) in str(e.value)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"size": 0}, r"data\.kwargs\.size"),
        ({"size": [4, 4, 4]}, r"data\.kwargs\.size"),
        ({"size": "big"}, r"data\.kwargs\.size"),
        ({"grayscale": "yes"}, r"data\.kwargs\.grayscale"),
        ({"mean": [0.5, 0.5, 0.5]}, r"data\.kwargs\.mean and data\.kwargs\.std go together"),
        ({"mean": [0.5], "std": [0.5]}, r"data\.kwargs\.mean must be a list of 3"),
        ({"mean": [0.5], "std": [0.0], "grayscale": True}, r"data\.kwargs\.std must be positive"),
    ],
)
def test_imagefolder_bad_options(tmp_path: Path, kwargs: dict[str, Any], match: str) -> None:
    image_root(tmp_path, {"train": 1})
    with pytest.raises(DataError, match=match):
        make_splits("imagefolder", {"root": tmp_path, **kwargs})


# ---------------------------------------------------------------- package.module:callable

USER_MODULE = '''
import torch
from torch.utils.data import Dataset, IterableDataset

from graftnet.data import Source, Splits, TensorData

CALLS = []


def xy(n, start=0, classes=3):
    x = torch.arange(start, start + n, dtype=torch.float32).view(n, 1, 1).expand(n, 1, 4).clone()
    return x, torch.arange(start, start + n) % classes


class Pairs(Dataset):
    """Samples without a targets attribute: graftnet must read labels from the samples."""

    def __init__(self, x, y):
        self.x, self.y, self.reads = x, y, 0

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        self.reads += 1
        return self.x[i], int(self.y[i])


class Counted(TensorData):
    """In-memory samples that count their reads: graftnet must take the labels from y."""

    reads = 0

    def __getitem__(self, i):
        self.reads += 1
        return super().__getitem__(i)


class Targeted(Pairs):
    @property
    def targets(self):
        return self.y.tolist()


def source(*, augment, n=30):
    CALLS.append(augment)
    x, y = xy(n)
    xt, yt = xy(9, 100)
    return Source(TensorData(x, y), TensorData(x, y), TensorData(xt, yt), y, yt, 3, (1, 4))


GIVEN = Splits(TensorData(*xy(20)), TensorData(*xy(6, 50)), TensorData(*xy(6, 80)), 3, (1, 4))


def splits(*, augment):
    return GIVEN


PARTS = {}


def mapping(*, augment, val=True, test=True, num_classes=None, kind="tensor", n=20):
    make = {"tensor": TensorData, "pairs": Pairs, "targeted": Targeted, "counted": Counted}[kind]
    result = {"train": make(*xy(n))}
    if val:
        result["val"] = make(*xy(6, 50))
    if test:
        x, y = xy(5, 80)
        y[-1] = 4  # only the test split has label 4: the inferred num_classes must look there too
        result["test"] = make(x, y)
    if num_classes is not None:
        result["num_classes"] = num_classes
    PARTS.clear()
    PARTS.update(result)
    return result


def unknown_keys(*, augment):
    return {"train": TensorData(*xy(10)), "validation": TensorData(*xy(3)), "labels": 3}


def no_train(*, augment):
    return {"val": TensorData(*xy(10))}


def a_list(*, augment):
    return [TensorData(*xy(10))]


def float_labels(*, augment):
    return {"train": [(torch.zeros(2), 0.5)] * 4}


def not_tensors(*, augment):
    return {"train": [([0.0, 1.0], 1)] * 4}


def not_pairs(*, augment):
    return {"train": [torch.zeros(2)] * 4}


class Stream(IterableDataset):
    def __iter__(self):
        yield torch.zeros(2), 0


def streaming(*, augment):
    return {"train": Stream()}


def bad_splits(*, augment):
    return Splits([(torch.zeros(2), 0)], ["oops"], None, 1, (2,))


def bad_targets(*, augment):
    ds = Pairs(*xy(6))
    ds.targets = [0.5] * 6
    return {"train": ds}


def wrong_targets(*, augment):
    ds = Pairs(*xy(6))
    ds.targets = [2, 0, 1, 2, 0, 1]
    return {"train": ds}


def needs_root(*, augment, root):
    return source(augment=augment)


NOT_CALLABLE = 3


class Factory:
    def build(*, augment):
        return source(augment=augment)
'''


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A fresh module (unique name, so imports never hit a cached one) written into tmp_path, on sys.path."""
    name = f"graftnet_user_data_{next(_serial)}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    return importlib.import_module(name)


def test_reference_returning_a_source_works_like_a_registered_dataset(user_module: Any) -> None:
    ref = f"{user_module.__name__}:source"
    splits = make_splits(ref, {"n": 40}, val_size=10, augment=False)
    assert user_module.CALLS == [False]  # augment and the kwargs reach the callable
    assert len(splits.train) == 30 and len(splits.val) == 10 and len(splits.test) == 9  # type: ignore[arg-type]
    assert splits.num_classes == 3 and splits.input_shape == (1, 4)
    subset = make_splits(ref, classes=[2, 1], val_size=4, train_size=5)
    assert subset.num_classes == 2 and len(subset.train) == 5  # type: ignore[arg-type]
    assert isinstance(subset.test, TensorData) and sorted(set(subset.test.y.tolist())) == [0, 1]


def test_reference_can_name_an_attribute_path(user_module: Any) -> None:
    splits = make_splits(f"{user_module.__name__}:Factory.build", val_size=3)
    assert len(splits.val) == 3  # type: ignore[arg-type]


def test_reference_returning_splits_is_used_as_given(user_module: Any) -> None:
    splits = make_splits(f"{user_module.__name__}:splits", val_size=0.5)
    given = user_module.GIVEN
    assert splits.train is given.train and splits.val is given.val and splits.test is given.test
    assert splits.num_classes == 3 and splits.input_shape == (1, 4)


def test_reference_mapping_with_val_is_used_as_given(user_module: Any) -> None:
    splits = make_splits(f"{user_module.__name__}:mapping", val_size=0.5)
    parts = user_module.PARTS
    assert splits.train is parts["train"] and splits.val is parts["val"] and splits.test is parts["test"]
    assert splits.num_classes == 5  # the largest label, 4, is only in the test split
    assert splits.input_shape == (1, 4)


def test_reference_mapping_num_classes_is_taken_as_given(user_module: Any) -> None:
    assert make_splits(f"{user_module.__name__}:mapping", {"num_classes": 10}).num_classes == 10
    with pytest.raises(DataError, match="num_classes 4 but has a label 4"):
        make_splits(f"{user_module.__name__}:mapping", {"num_classes": 4})
    with pytest.raises(DataError, match="num_classes 'many'.*positive integer"):
        make_splits(f"{user_module.__name__}:mapping", {"num_classes": "many"})


def test_reference_mapping_without_val_is_carved(user_module: Any) -> None:
    splits = make_splits(f"{user_module.__name__}:mapping", {"val": False}, val_size=4, seed=2)
    train = user_module.PARTS["train"]
    assert isinstance(splits.val, TensorData) and isinstance(splits.train, TensorData)
    assert len(splits.val) == 4 and len(splits.train) == 16
    # The carved samples are train's, in the order make_splits draws them.
    order = torch.randperm(20, generator=torch.Generator().manual_seed(2))
    assert torch.equal(splits.val.x, train.x[order[:4]]) and torch.equal(splits.train.x, train.x[order[4:]])
    assert isinstance(splits.test, TensorData) and torch.equal(splits.test.x, user_module.PARTS["test"].x)
    picked = make_splits(f"{user_module.__name__}:mapping", {"val": False}, classes=[1], val_size=2)
    assert picked.num_classes == 1 and isinstance(picked.test, TensorData) and picked.test.y.tolist() == [0]


def test_reference_mapping_without_test_has_no_test_split(user_module: Any) -> None:
    assert make_splits(f"{user_module.__name__}:mapping", {"test": False}).test is None
    assert make_splits(f"{user_module.__name__}:mapping", {"test": False, "val": False}, val_size=2).test is None


def test_reference_given_val_train_size_keeps_a_seeded_subset(user_module: Any) -> None:
    splits = make_splits(f"{user_module.__name__}:mapping", train_size=7, seed=5)
    keep = torch.randperm(20, generator=torch.Generator().manual_seed(5))[:7]
    assert isinstance(splits.train, TensorData)
    assert torch.equal(splits.train.x, user_module.PARTS["train"].x[keep])
    assert splits.val is user_module.PARTS["val"]
    pairs = make_splits(f"{user_module.__name__}:mapping", {"kind": "pairs"}, train_size=7, seed=5)
    assert isinstance(pairs.train, Subset) and pairs.train.indices == keep.tolist()
    with pytest.raises(DataError, match=r"data\.train_size: 21 .* only 20"):
        make_splits(f"{user_module.__name__}:mapping", train_size=21)


@pytest.mark.parametrize(
    ("option", "value"), [("classes", [0, 1]), ("label_map", {0: 1, 1: 0, 2: 2}), ("shuffle_labels", True)]
)
@pytest.mark.parametrize("target", ["mapping", "splits"])
def test_reference_given_val_refuses_class_options(user_module: Any, target: str, option: str, value: Any) -> None:
    with pytest.raises(DataError, match=rf"data\.{option}: .* its own validation split.*only when graftnet draws"):
        make_splits(f"{user_module.__name__}:{target}", **{option: value})


@pytest.mark.parametrize(("kind", "expected_reads"), [("pairs", 21), ("targeted", 2), ("counted", 2)])
def test_reference_labels_are_read_from_targets_or_samples(user_module: Any, kind: str, expected_reads: int) -> None:
    splits = make_splits(f"{user_module.__name__}:mapping", {"kind": kind, "val": False}, val_size=4)
    assert splits.num_classes == 5
    reads = user_module.PARTS["train"].reads
    # With y or targets, only the first sample is loaded (checked, then its shape read); else every sample once.
    assert reads == expected_reads
    labels = sorted(splits.train[i][1] for i in range(len(splits.train)))  # type: ignore[arg-type]
    labels += [splits.val[i][1] for i in range(len(splits.val))]  # type: ignore[arg-type]
    assert sorted(labels) == sorted((torch.arange(20) % 3).tolist())


@pytest.mark.parametrize(
    ("target", "match"),
    [
        ("a_list", r"data\.dataset: .*:a_list returned a list; it must return a graftnet\.data\.Source"),
        ("unknown_keys", r"unknown keys 'validation', 'labels'; the allowed keys are train \(required\), val, test"),
        ("no_train", r"without 'train'"),
        ("float_labels", r"sample 0 of .*'s train split is a tuple of \(Tensor, float\)"),
        ("not_tensors", r"sample 0 .* \(list, int\).*\(input tensor, integer label\) pair"),
        ("not_pairs", r"sample 0 .* is a Tensor;"),
        ("streaming", r"train split is a Stream, not a map-style dataset"),
        ("bad_splits", r"sample 0 of .*'s val split is a str"),
        ("bad_targets", r"targets attribute of .*'s train split is not 6 integer labels"),
        ("wrong_targets", r"targets attribute .* says sample 0 has label 2, but the sample itself has label 0"),
    ],
)
def test_reference_bad_returns(user_module: Any, target: str, match: str) -> None:
    with pytest.raises(DataError, match=match):
        make_splits(f"{user_module.__name__}:{target}")


def test_reference_that_cannot_be_imported(user_module: Any) -> None:
    with pytest.raises(DataError, match=r"data\.dataset: cannot import 'no_such_pkg_xyz\.sets'"):
        make_splits("no_such_pkg_xyz.sets:build")
    with pytest.raises(DataError, match=rf"data\.dataset: module '{user_module.__name__}' has no attribute 'nope'"):
        make_splits(f"{user_module.__name__}:nope")
    with pytest.raises(DataError, match=r"data\.dataset: .*NOT_CALLABLE is a int, not a callable"):
        make_splits(f"{user_module.__name__}:NOT_CALLABLE")
    with pytest.raises(DataError, match=r"data\.dataset: ':build' is not a registered dataset name"):
        make_splits(":build")


def test_reference_called_with_kwargs_it_does_not_take(user_module: Any) -> None:
    with pytest.raises(DataError, match=r"data\.kwargs: .*:needs_root cannot be called with \(augment\)"):
        make_splits(f"{user_module.__name__}:needs_root")
    with pytest.raises(DataError, match=r"data\.kwargs: .*:source cannot be called with \(augment, colour\)"):
        make_splits(f"{user_module.__name__}:source", {"colour": "red"})


def test_unknown_registered_name_points_at_references() -> None:
    with pytest.raises(DataError, match=r"data\.dataset: unknown dataset 'digitz'.*'digits'.*package\.module:callable"):
        make_splits("digitz")


def test_registered_names_cannot_contain_a_colon() -> None:
    from graftnet.data import register_dataset

    with pytest.raises(DataError, match="contains ':'"):
        register_dataset("my:data")
    assert "my:data" not in DATASETS


# ---------------------------------------------------------------- task_splits


def test_task_splits_checks_input_shape(user_module: Any) -> None:
    data = DataSpec(dataset=f"{user_module.__name__}:mapping")
    splits = task_splits(Spec(data=data, input_shape=[1, 4]))
    assert isinstance(splits, Splits) and splits.input_shape == (1, 4)
    with pytest.raises(SpecError, match=r"input_shape: the spec says \[3, 4\] but .* samples are \[1, 4\]"):
        task_splits(Spec(data=data, input_shape=[3, 4]))
    with pytest.raises(SpecError, match="data: the spec has no data section"):
        task_splits(Spec())
