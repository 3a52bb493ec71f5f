"""Adapters Q that map a teacher activation onto a student site's shape, and teacher input adapters.

Both are string-keyed registries (docs/architecture.md): a spec names an adapter by key and never imports code.
A tap adapter factory takes ``(tap_shape, site_shape)`` — shapes without the batch dimension — and
returns a module; an input adapter factory takes the student's input shape and its spec kwargs.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from graftnet.errors import AdapterError, GraftError
from graftnet.registry import Registry
from graftnet.spec import MAX_INPUT_ELEMENTS, clip, short_repr

__all__ = [
    "ADAPTERS",
    "INPUT_ADAPTERS",
    "MapAdapter",
    "Normalize",
    "Resize",
    "make_adapter",
    "register_adapter",
    "register_input_adapter",
]

Shape = tuple[int, ...]
AdapterFactory = Callable[[Shape, Shape], nn.Module]
InputAdapterFactory = Callable[..., nn.Module]

ADAPTERS: Registry[AdapterFactory] = Registry("adapter", AdapterError)
INPUT_ADAPTERS: Registry[InputAdapterFactory] = Registry("input adapter", AdapterError)


def register_adapter(key: str) -> Callable[[AdapterFactory], AdapterFactory]:
    """Register a tap adapter factory ``f(tap_shape, site_shape) -> nn.Module`` under ``key``.

    Examples:
        >>> @register_adapter("zero")
        ... def zero(tap_shape, site_shape):
        ...     return ZeroLike(site_shape)   # doctest: +SKIP
    """
    return ADAPTERS.register(key)


def register_input_adapter(key: str) -> Callable[[InputAdapterFactory], InputAdapterFactory]:
    """Register a teacher input adapter factory ``f(input_shape, **kwargs) -> nn.Module`` under ``key``."""
    return INPUT_ADAPTERS.register(key)


def _resize(t: torch.Tensor, size: Shape) -> torch.Tensor:
    """Adaptive average pooling to shrink, (bi/tri)linear interpolation to grow."""
    src = tuple(t.shape[2:])
    if src == size:
        return t
    pools: tuple[Callable[..., torch.Tensor], ...] = (
        F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d
    )  # fmt: skip
    pool = pools[len(size) - 1]
    if all(s >= d for s, d in zip(src, size, strict=True)):
        return pool(t, size)
    smaller = tuple(min(s, d) for s, d in zip(src, size, strict=True))
    if smaller != src:
        t = pool(t, smaller)
    mode = ("linear", "bilinear", "trilinear")[len(size) - 1]
    return F.interpolate(t, size=size, mode=mode, align_corners=False)


class MapAdapter(nn.Module):
    """A 1×1 convolution between channel counts plus a spatial resize, the conv at the cheaper resolution."""

    def __init__(self, tap_shape: Shape, site_shape: Shape) -> None:
        super().__init__()
        rank = len(site_shape) - 1
        conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[rank - 1]
        self.conv = conv(tap_shape[0], site_shape[0], kernel_size=1)
        self.size = tuple(site_shape[1:])
        # A 1x1 conv costs per position: shrink first when the site is smaller, grow last when it is larger.
        self.resize_first = math.prod(site_shape[1:]) < math.prod(tap_shape[1:])

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        if self.resize_first:
            return self.conv(_resize(t, self.size))
        return _resize(self.conv(t), self.size)

    def extra_repr(self) -> str:
        return f"size={self.size}, resize_first={self.resize_first}"


def _is_map(shape: Shape) -> bool:
    return 2 <= len(shape) <= 4


def _no_adapter(key: str, tap_shape: Shape, site_shape: Shape, why: str) -> AdapterError:
    return AdapterError(
        f"adapter {key!r} cannot map a tap of shape {tap_shape} onto a site of shape {site_shape}: {why}. "
        f"Pick other layers, or another adapter (valid: {', '.join(ADAPTERS.keys())})"
    )


@register_adapter("identity")
def identity(tap_shape: Shape, site_shape: Shape) -> nn.Module:
    if tap_shape != site_shape:
        raise _no_adapter("identity", tap_shape, site_shape, "shapes differ")
    return nn.Identity()


# A dense adapter's matrix holds at most this many weights (1 GiB in float32): flattening two feature maps into one
# Linear grows as the product of their sizes.
MAX_DENSE_WEIGHTS = 2**28


def _dense(key: str, tap_shape: Shape, site_shape: Shape) -> None:
    weights = math.prod(tap_shape) * math.prod(site_shape)
    if weights > MAX_DENSE_WEIGHTS:
        raise _no_adapter(
            key, tap_shape, site_shape,
            f"its dense matrix would hold {weights} weights, more than {MAX_DENSE_WEIGHTS} (2**28); use 'conv1x1' "
            "between feature maps of the same rank, or tap a smaller activation",
        )  # fmt: skip


@register_adapter("linear")
def linear(tap_shape: Shape, site_shape: Shape) -> nn.Module:
    """Flatten, one dense matrix (the paper's Q in full), reshape to the site."""
    _dense("linear", tap_shape, site_shape)
    layers: list[nn.Module] = [nn.Flatten(), nn.Linear(math.prod(tap_shape), math.prod(site_shape))]
    if len(site_shape) > 1:
        layers.append(nn.Unflatten(1, site_shape))
    return nn.Sequential(*layers)


@register_adapter("conv1x1")
def conv1x1(tap_shape: Shape, site_shape: Shape) -> nn.Module:
    if not (_is_map(tap_shape) and _is_map(site_shape) and len(tap_shape) == len(site_shape)):
        raise _no_adapter("conv1x1", tap_shape, site_shape, "both must be feature maps of the same rank")
    return MapAdapter(tap_shape, site_shape)


@register_adapter("auto")
def auto(tap_shape: Shape, site_shape: Shape) -> nn.Module:
    """Identity for equal shapes; Linear for vectors; 1×1 conv + resize for maps; flatten+Linear map→vector."""
    if tap_shape == site_shape:
        return nn.Identity()
    if len(tap_shape) == 1 and len(site_shape) == 1:
        _dense("auto", tap_shape, site_shape)
        return nn.Linear(tap_shape[0], site_shape[0])
    if _is_map(tap_shape) and _is_map(site_shape) and len(tap_shape) == len(site_shape):
        return MapAdapter(tap_shape, site_shape)
    if _is_map(tap_shape) and len(site_shape) == 1:
        _dense("auto", tap_shape, site_shape)
        return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(tap_shape), site_shape[0]))
    raise _no_adapter(
        "auto", tap_shape, site_shape,
        "auto maps vector→vector, map→map of the same rank, and map→vector; use 'linear' to force a dense map",
    )  # fmt: skip


def make_adapter(key: str, tap_shape: Shape, site_shape: Shape) -> nn.Module:
    return ADAPTERS.get(key)(tap_shape, site_shape)


# --- teacher input adapters: student input -> what the teacher expects --------------------------------


class Resize(nn.Module):
    """Resize the spatial dims of a batch to ``size`` (fixed: no parameters)."""

    def __init__(self, size: Sequence[int], mode: str = "bilinear") -> None:
        super().__init__()
        self.size = tuple(int(s) for s in size)
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode in ("nearest", "area"):
            return F.interpolate(x, size=self.size, mode=self.mode)
        return F.interpolate(x, size=self.size, mode=self.mode, align_corners=False)


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std`` (fixed: kept as buffers, not parameters)."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float], rank: int) -> None:
        super().__init__()
        view = (1, -1) + (1,) * rank
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(view))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(view))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def _need_map(key: str, input_shape: Shape) -> None:
    if not _is_map(input_shape):
        raise AdapterError(f"input adapter {key!r} needs a (C, ...spatial) input, got shape {input_shape}")


def _bounded(key: str, output_shape: Shape) -> None:
    """Refuse an input adapter whose output sample would be larger than an input_shape may be."""
    if math.prod(output_shape) > MAX_INPUT_ELEMENTS:
        raise AdapterError(
            f"input adapter {key!r} would make samples of shape {output_shape}, {math.prod(output_shape)} elements, "
            f"more than the {MAX_INPUT_ELEMENTS} (2**28) an input may have; give the size the teacher expects"
        )


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


# Modes F.interpolate accepts per number of spatial dims, limited to those Resize passes align_corners right for.
_RESIZE_MODES: dict[int, tuple[str, ...]] = {
    1: ("linear", "nearest", "area"),
    2: ("bilinear", "bicubic", "nearest", "area"),
    3: ("trilinear", "nearest", "area"),
}


@register_input_adapter("identity")
def _input_identity(input_shape: Shape) -> nn.Module:
    return nn.Identity()


@register_input_adapter("resize")
def _input_resize(input_shape: Shape, size: Sequence[int], mode: str = "bilinear") -> nn.Module:
    _need_map("resize", input_shape)
    rank = len(input_shape) - 1
    if isinstance(size, str) or not isinstance(size, Sequence) or not all(_is_int(s) and s >= 1 for s in size):
        raise AdapterError(
            f"input adapter 'resize': size must be a list of {rank} positive integers (the spatial size the "
            f"teacher expects, e.g. {[224] * rank}), got {short_repr(size)}"
        )
    if len(size) != rank:
        raise AdapterError(f"input adapter 'resize': size {short_repr(list(size))} must have {rank} entries")
    _bounded("resize", (input_shape[0], *size))
    modes = _RESIZE_MODES[rank]
    if mode not in modes:
        raise AdapterError(
            f"input adapter 'resize': mode {short_repr(mode)} does not resize an input with {rank} spatial "
            f"dim{'s' if rank > 1 else ''} (shape {input_shape}); use one of {', '.join(map(repr, modes))}"
        )
    return Resize(size, mode)


@register_input_adapter("normalize")
def _input_normalize(input_shape: Shape, mean: Sequence[float], std: Sequence[float]) -> nn.Module:
    _need_map("normalize", input_shape)
    for name, values in (("mean", mean), ("std", std)):
        if isinstance(values, str) or not isinstance(values, Sequence) or not all(map(_is_number, values)):
            raise AdapterError(
                f"input adapter 'normalize': {name} must be a list of numbers, one per channel, "
                f"got {short_repr(values)}"
            )
    if not len(mean) == len(std) == input_shape[0]:
        raise AdapterError(
            f"input adapter 'normalize': mean and std need {input_shape[0]} entries (one per channel), "
            f"got {len(mean)} and {len(std)}"
        )
    if not all(s > 0 for s in std):
        raise AdapterError(f"input adapter 'normalize': every std must be positive (it divides), got {list(std)}")
    return Normalize(mean, std, rank=len(input_shape) - 1)


@register_input_adapter("conv1x1")
def _input_conv1x1(input_shape: Shape, out_channels: int) -> nn.Module:
    """A learned 1×1 convolution to the teacher's channel count; it trains through the frozen teacher."""
    _need_map("conv1x1", input_shape)
    if not (_is_int(out_channels) and out_channels >= 1):
        raise AdapterError(
            f"input adapter 'conv1x1': out_channels must be a positive integer (the channels the teacher "
            f"expects), got {short_repr(out_channels)}"
        )
    _bounded("conv1x1", (int(out_channels), *input_shape[1:]))
    conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[len(input_shape) - 2]
    return conv(input_shape[0], int(out_channels), kernel_size=1)


# What a factory or a first run of its module raises for arguments it rejects; named and placed by the caller.
_STEP_ERRORS = (TypeError, ValueError, RuntimeError, AssertionError, KeyError, IndexError, ZeroDivisionError)


def make_input_adapter(
    steps: Sequence[tuple[str, dict[str, Any]]], input_shape: Shape, *, where: str = "input"
) -> nn.Module:
    """Chain input adapter steps; each step sees the shape the previous one produced.

    Args:
        steps: ``(key, kwargs)`` per step, in order.
        input_shape: the shape of one input sample (no batch dimension).
        where: the spec path of the step list (``teachers.NAME.input``); errors start ``where[i]:``.

    Raises:
        AdapterError: a key is unknown, or a step rejects its arguments or the shape it is given.
    """
    modules: list[nn.Module] = []
    shape = input_shape
    for i, (key, kwargs) in enumerate(steps):
        at = f"{where}[{i}]"
        try:
            factory = INPUT_ADAPTERS.get(key)
            module = factory(shape, **kwargs)
        except AdapterError as e:
            raise AdapterError(f"{at}: {e}") from e
        except GraftError:
            raise
        except _STEP_ERRORS as e:
            params = list(inspect.signature(factory).parameters)[1:]
            raise AdapterError(
                f"{at}: input adapter {key!r}: bad arguments {short_repr(kwargs)}: {type(e).__name__}: {clip(str(e))} "
                f"(it takes {', '.join(params) or 'no arguments'})"
            ) from e
        try:
            with torch.no_grad():
                shape = tuple(module(torch.zeros(1, *shape)).shape[1:])
        except GraftError:
            raise
        except _STEP_ERRORS as e:  # F.interpolate's NotImplementedError is a RuntimeError
            raise AdapterError(
                f"{at}: input adapter {key!r} with {short_repr(kwargs)} cannot run on an input of shape {shape}: "
                f"{type(e).__name__}: {clip(str(e))}"
            ) from e
        modules.append(module)
    return modules[0] if len(modules) == 1 else nn.Sequential(*modules)
