"""Adapters Q that map a teacher activation onto a student site's shape, and teacher input adapters.

Both are string-keyed registries (docs/architecture.md): a spec names an adapter by key and never imports code.
A tap adapter factory takes ``(tap_shape, site_shape)`` — shapes without the batch dimension — and
returns a module; one that also takes ``tap_layout`` and ``site_layout`` keywords gets each side's
:class:`~graftnet.layouts.Layout` (channels first or last, tokens on a grid, vector), read from the graph. An input
adapter factory takes the student's input shape and its spec kwargs.
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
from graftnet.layouts import CHANNELS_LAST, TOKENS, UNKNOWN, VECTOR, Layout, default_layout
from graftnet.registry import Registry
from graftnet.spec import MAX_INPUT_ELEMENTS, clip, short_repr

__all__ = [
    "ADAPTERS",
    "INPUT_ADAPTERS",
    "MapAdapter",
    "MapToTokens",
    "MoveChannels",
    "Normalize",
    "PointwiseConv1d",
    "PointwiseConv2d",
    "PointwiseConv3d",
    "Resize",
    "TokensToMap",
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


class MoveChannels(nn.Module):
    """Move the channel axis of a batch between last and first (channels-last map ↔ channels-first map)."""

    def __init__(self, to_first: bool) -> None:
        super().__init__()
        self.to_first = to_first

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return t.movedim(-1, 1) if self.to_first else t.movedim(1, -1)

    def extra_repr(self) -> str:
        return "last → first" if self.to_first else "first → last"


class TokensToMap(nn.Module):
    """Tokens (N, D) cut from a grid → a channels-first map (D, *grid); the class/register tokens in front are
    dropped (they have no place on the grid)."""

    def __init__(self, grid: Shape, prefix: int) -> None:
        super().__init__()
        self.grid, self.prefix = tuple(grid), prefix

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return t[:, self.prefix :].transpose(1, 2).reshape(t.shape[0], t.shape[2], *self.grid)

    def extra_repr(self) -> str:
        return f"grid={self.grid}, prefix={self.prefix}"


class MapToTokens(nn.Module):
    """A channels-first map (D, *grid) → tokens (prefix + |grid|, D), row-major like a patch embedding; each
    class/register token in front gets the map's average, the summary of the whole image such tokens carry."""

    def __init__(self, prefix: int) -> None:
        super().__init__()
        self.prefix = prefix

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        tokens = t.flatten(2).transpose(1, 2)
        if not self.prefix:
            return tokens
        summary = tokens.mean(1, keepdim=True).expand(-1, self.prefix, -1)
        return torch.cat([summary, tokens], dim=1)

    def extra_repr(self) -> str:
        return f"prefix={self.prefix}"


def _as_map(shape: Shape, layout: Layout) -> tuple[Shape, nn.Module | None]:
    """The channels-first map shape a tensor of ``layout`` reads as, and the module that turns it into one."""
    if layout.kind == CHANNELS_LAST:
        return (shape[-1], *shape[:-1]), MoveChannels(to_first=True)
    if layout.kind == TOKENS:
        assert layout.grid is not None
        return (shape[-1], *layout.grid), TokensToMap(layout.grid, layout.prefix)
    if layout.grid is not None:  # channels first, flattened
        return (shape[0], *layout.grid), nn.Unflatten(2, layout.grid)
    return shape, None


def _from_map(shape: Shape, layout: Layout) -> nn.Module | None:
    """The module that turns the channels-first map :func:`_as_map` gives for ``(shape, layout)`` back into it."""
    if layout.kind == CHANNELS_LAST:
        return MoveChannels(to_first=False)
    if layout.kind == TOKENS:
        return MapToTokens(layout.prefix)
    if layout.grid is not None:
        return nn.Flatten(2)
    return None


def _chain(*modules: nn.Module | None) -> nn.Module:
    present = [m for m in modules if m is not None]
    return present[0] if len(present) == 1 else nn.Sequential(*present)


def _map_to_map(tap_shape: Shape, site_shape: Shape, tap_layout: Layout, site_layout: Layout) -> nn.Module | None:
    """1×1 conv + resize between two tensors that read as feature maps of the same rank, in their own layouts."""
    tap_map, to_map = _as_map(tap_shape, tap_layout)
    site_map, _ = _as_map(site_shape, site_layout)
    if not (_is_map(tap_map) and _is_map(site_map) and len(tap_map) == len(site_map)):
        return None
    return _chain(to_map, MapAdapter(tap_map, site_map), _from_map(site_shape, site_layout))


class MeanTokens(nn.Module):
    """Average a token sequence (N, D) → (D,)."""

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return t.mean(1)


def _no_adapter(key: str, tap_shape: Shape, site_shape: Shape, why: str) -> AdapterError:
    return AdapterError(
        f"adapter {key!r} cannot map a tap of shape {tap_shape} onto a site of shape {site_shape}: {why}. "
        f"Pick other layers, or another adapter (valid: {', '.join(ADAPTERS.keys())})"
    )


def _layouts(
    tap_shape: Shape, site_shape: Shape, tap_layout: Layout | None, site_layout: Layout | None
) -> tuple[Layout, Layout]:
    return (tap_layout or default_layout(tap_shape), site_layout or default_layout(site_shape))


def _same(tap_shape: Shape, site_shape: Shape, tap_layout: Layout, site_layout: Layout) -> bool:
    """Equal shapes, unless both layouts are known and differ: a layout the graph cannot tell (an opaque module in
    between) is needed only to build a mapping, and equal shapes are the same-architecture case."""
    return tap_shape == site_shape and (tap_layout == site_layout or UNKNOWN in (tap_layout.kind, site_layout.kind))


@register_adapter("identity")
def identity(
    tap_shape: Shape, site_shape: Shape, *, tap_layout: Layout | None = None, site_layout: Layout | None = None
) -> nn.Module:
    tl, sl = _layouts(tap_shape, site_shape, tap_layout, site_layout)
    if tap_shape != site_shape:
        raise _no_adapter("identity", tap_shape, site_shape, "shapes differ")
    if not _same(tap_shape, site_shape, tl, sl):
        raise _no_adapter("identity", tap_shape, site_shape, f"the layouts differ ({tl} tap, {sl} site)")
    return nn.Identity()


# A dense adapter's matrix holds at most this many weights (1 GiB in float32): flattening two feature maps into one
# Linear grows as the product of their sizes.
MAX_DENSE_WEIGHTS = 2**28


def _dense(key: str, tap_shape: Shape, site_shape: Shape) -> None:
    weights = math.prod(tap_shape) * math.prod(site_shape)
    if weights > MAX_DENSE_WEIGHTS:
        raise _no_adapter(
            key, tap_shape, site_shape,
            f"its dense matrix would hold {weights} weights, more than {MAX_DENSE_WEIGHTS} (2**28); use 'auto' "
            "between feature maps and tokens, or tap a smaller activation",
        )  # fmt: skip


@register_adapter("linear")
def linear(tap_shape: Shape, site_shape: Shape, **_layouts: Layout | None) -> nn.Module:
    """Flatten, one dense matrix (the paper's Q in full), reshape to the site: no layout needed."""
    _dense("linear", tap_shape, site_shape)
    layers: list[nn.Module] = [nn.Flatten(), nn.Linear(math.prod(tap_shape), math.prod(site_shape))]
    if len(site_shape) > 1:
        layers.append(nn.Unflatten(1, site_shape))
    return nn.Sequential(*layers)


@register_adapter("conv1x1")
def conv1x1(
    tap_shape: Shape, site_shape: Shape, *, tap_layout: Layout | None = None, site_layout: Layout | None = None
) -> nn.Module:
    """1×1 conv + resize between feature maps of the same rank, each in its own layout (tokens on a grid count)."""
    tl, sl = _layouts(tap_shape, site_shape, tap_layout, site_layout)
    adapter = _map_to_map(tap_shape, site_shape, tl, sl) if tl.is_map and sl.is_map else None
    if adapter is None:
        raise _no_adapter(
            "conv1x1", tap_shape, site_shape, f"both must be feature maps of the same rank (tap {tl}, site {sl})"
        )
    return adapter


@register_adapter("auto")
def auto(
    tap_shape: Shape, site_shape: Shape, *, tap_layout: Layout | None = None, site_layout: Layout | None = None
) -> nn.Module:
    """The cheapest sensible map between two layouts (README "Adapters").

    Identity for equal shapes and layouts; ``Linear`` for vectors and between token sequences of one length;
    1×1 conv + resize between feature maps, channels-last maps and tokens on a grid (moving the channel axis,
    dropping or filling class tokens); flatten + ``Linear`` from a map to a vector, mean + ``Linear`` from tokens
    to a vector. Layouts come from the graph; without them a shape reads as PyTorch's channels-first convention.
    An ``unknown`` layout is refused, never guessed.
    """
    tl, sl = _layouts(tap_shape, site_shape, tap_layout, site_layout)
    if _same(tap_shape, site_shape, tl, sl):
        return nn.Identity()
    for which, layout, shape in (("tap", tl, tap_shape), ("site", sl, site_shape)):
        if layout.kind == UNKNOWN:
            raise _no_adapter(
                "auto", tap_shape, site_shape,
                f"the {which}'s layout (which axis holds its channels) cannot be read from the ops around it "
                f"(shape {shape}), and auto does not guess it; register an adapter for it, or use 'linear' (dense)",
            )  # fmt: skip
    if tl.kind == VECTOR and sl.kind == VECTOR:
        _dense("auto", tap_shape, site_shape)
        return nn.Linear(tap_shape[0], site_shape[0])
    if tl.kind == sl.kind == TOKENS and tap_shape[0] == site_shape[0] and tl.prefix == sl.prefix and tl.grid == sl.grid:
        return nn.Linear(tap_shape[1], site_shape[1])  # token by token, class tokens onto class tokens
    if tl.is_map and sl.is_map:
        adapter = _map_to_map(tap_shape, site_shape, tl, sl)
        if adapter is not None:
            return adapter
        ranks = [len(_as_map(shape, layout)[0]) - 1 for shape, layout in ((tap_shape, tl), (site_shape, sl))]
        raise _no_adapter(
            "auto", tap_shape, site_shape,
            f"the tap reads as a {ranks[0]}-D map and the site as a {ranks[1]}-D map ({tl} and {sl}), and the graph "
            "shows no grid that would reshape one into the other; register an adapter for this pair",
        )  # fmt: skip
    if sl.kind == VECTOR and tl.kind == TOKENS:
        return nn.Sequential(MeanTokens(), nn.Linear(tap_shape[1], site_shape[0]))
    if sl.kind == VECTOR and tl.is_map:
        tap_map, to_map = _as_map(tap_shape, tl)
        _dense("auto", tap_map, site_shape)
        return _chain(to_map, nn.Flatten(), nn.Linear(math.prod(tap_map), site_shape[0]))
    if TOKENS in (tl.kind, sl.kind):
        raise _no_adapter(
            "auto", tap_shape, site_shape,
            f"the tap is {tl} and the site {sl}: tokens map onto a feature map only when the graph shows the grid they "
            "were cut from, and onto tokens of another length only through one; register an adapter for this pair",
        )  # fmt: skip
    raise _no_adapter(
        "auto", tap_shape, site_shape,
        f"the tap is {tl} and the site {sl}; auto maps vector→vector, map→map of the same rank (channels first or "
        "last, tokens on a grid), map or tokens→vector; use 'linear' to force a dense map",
    )  # fmt: skip


def make_adapter(
    key: str, tap_shape: Shape, site_shape: Shape, tap_layout: Layout | None = None, site_layout: Layout | None = None
) -> nn.Module:
    """Build adapter ``key``; factories that take ``tap_layout``/``site_layout`` keywords are given the layouts."""
    factory = ADAPTERS.get(key)
    params = inspect.signature(factory).parameters
    takes = {"tap_layout", "site_layout"} <= set(params) or any(p.kind is p.VAR_KEYWORD for p in params.values())
    if takes:
        return factory(tap_shape, site_shape, tap_layout=tap_layout, site_layout=site_layout)  # type: ignore[call-arg]
    return factory(tap_shape, site_shape)


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


class _Pointwise:
    """A 1×1 convolution computed as one batched matrix product over the channels (the bias fused in).

    oneDNN's convolution is slow for the few channels of an input: a 4→4-channel 1×1 convolution on 80 frames of
    84×84 took 36 ms forward and 80 ms with the backward on one CPU thread, against 1.8 and 6.2 ms as a batched
    product; 99 against 4.1 ms forward for RGB 224×224, batch 32 (``benchmarks/bench_pointwise.py``). On wide
    feature maps it is not always the faster one (256 → 512 channels on 8×8: 18 against 37 ms with the backward),
    so the tap adapters stay convolutions. Parameters, names and initialisation are the convolution's, so
    checkpoints and state dicts do not change; inputs that are not a contiguous batch (another memory layout, no
    batch dimension) go to the convolution.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None
    out_channels: int

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True) -> None:
        super().__init__(in_channels, out_channels, kernel_size=1, bias=bias)  # type: ignore[call-arg]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != self.weight.dim() or not x.is_contiguous():
            return super().forward(x)  # type: ignore[misc,no-any-return]
        b, c = x.shape[:2]
        o = self.out_channels
        weight = self.weight.view(1, o, c).expand(b, o, c)  # a view: bmm reads the one matrix for every sample
        flat = x.reshape(b, c, -1)
        y = torch.bmm(weight, flat) if self.bias is None else torch.baddbmm(self.bias.view(1, o, 1), weight, flat)
        return y.view(b, o, *x.shape[2:])


class PointwiseConv1d(_Pointwise, nn.Conv1d):
    """``nn.Conv1d(in_channels, out_channels, kernel_size=1)`` computed as a batched matrix product."""


class PointwiseConv2d(_Pointwise, nn.Conv2d):
    """``nn.Conv2d(in_channels, out_channels, kernel_size=1)`` computed as a batched matrix product."""


class PointwiseConv3d(_Pointwise, nn.Conv3d):
    """``nn.Conv3d(in_channels, out_channels, kernel_size=1)`` computed as a batched matrix product."""


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
    conv = (PointwiseConv1d, PointwiseConv2d, PointwiseConv3d)[len(input_shape) - 2]
    return conv(input_shape[0], int(out_channels))


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
