"""The offline datasets: scikit-learn's ``digits`` and generated MNIST-1D, held in memory."""

from __future__ import annotations

import torch

from graftnet.data.sources import Source, TensorData, register_dataset
from graftnet.errors import DataError


def _shift(x: torch.Tensor, max_shift: int) -> torch.Tensor:
    """Translate each sample along its last ``d`` axes by a random integer in [−max_shift, max_shift], zero-filled.

    One gather per axis over the whole batch: cheap enough to run on every training batch.
    """
    out = x
    spatial = x.ndim - 2  # (N, C, *spatial)
    for axis in range(2, 2 + spatial):
        size = x.shape[axis]
        offsets = torch.randint(-max_shift, max_shift + 1, (x.shape[0],))
        source = torch.arange(size).unsqueeze(0) - offsets.unsqueeze(1)  # (N, size): where each output reads
        valid = (source >= 0) & (source < size)
        shape = [x.shape[0]] + [1] * (x.ndim - 1)
        shape[axis] = size
        index = source.clamp(0, size - 1).view(shape).expand_as(out)
        out = torch.gather(out, axis, index) * valid.view(shape).to(x.dtype)
    return out


@register_dataset("digits")
def digits(*, augment: bool = True, test_fraction: float = 0.25, split_seed: int = 0) -> Source:
    """scikit-learn's 1797 8×8 handwritten digits as (1, 8, 8) images in [0, 1].

    The data has no official test split: ``test_fraction`` of it is held out with ``split_seed`` (fixed by
    default, so every run tests on the same images). Augmentation: random ±1 pixel translations.
    """
    from sklearn.datasets import load_digits

    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"data.kwargs.test_fraction must lie strictly between 0 and 1, got {test_fraction}")
    raw = load_digits()
    x = torch.tensor(raw.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(raw.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(split_seed))
    n_test = int(round(test_fraction * len(x)))
    test, train = order[:n_test], order[n_test:]
    augmented = TensorData(x[train], y[train], (lambda b: _shift(b, 1)) if augment else None)
    plain = TensorData(x[train], y[train])
    return Source(augmented, plain, TensorData(x[test], y[test]), y[train], y[test], 10, (1, 8, 8))


@register_dataset("mnist1d")
def mnist1d(*, augment: bool = True, samples: int = 5000, seed: int = 42, train_split: float = 0.8) -> Source:
    """MNIST-1D (Greydanus 2020): 10 classes of length-40 signals, generated here as (1, 40) tensors.

    Generated with ``mnist1d.data.make_dataset`` (never its download path): ``samples`` in all,
    ``train_split`` of them for training, deterministic in ``seed``. Augmentation: random shifts of up to
    3 steps and small Gaussian noise.
    """
    from mnist1d.data import get_dataset_args, make_dataset

    if samples < 20:
        raise DataError(f"data.kwargs.samples must be at least 20 for mnist1d, got {samples}")
    args = get_dataset_args()
    args.num_samples, args.seed, args.train_split = samples, seed, train_split
    raw = make_dataset(args)
    x = torch.tensor(raw["x"], dtype=torch.float32).unsqueeze(1)
    x_test = torch.tensor(raw["x_test"], dtype=torch.float32).unsqueeze(1)
    y, y_test = torch.tensor(raw["y"], dtype=torch.long), torch.tensor(raw["y_test"], dtype=torch.long)

    def jitter(batch: torch.Tensor) -> torch.Tensor:
        return _shift(batch, 3) + 0.05 * torch.randn_like(batch)

    augmented = TensorData(x, y, jitter if augment else None)
    return Source(augmented, TensorData(x, y), TensorData(x_test, y_test), y, y_test, 10, (1, 40))
