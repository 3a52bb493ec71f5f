"""Which axis of an activation holds its channels, read from the graph (README "Layouts").

A pre-activation's shape alone does not say how to map it: ``(64, 8, 8)`` is a channels-first feature map after a
``Conv2d`` and ``(8, 8, 64)`` a channels-last one before a ``Linear`` (ConvNeXt, EdgeNeXt, Swin), and ``(37, 192)``
is a ViT's 36 patch tokens plus a class token. :func:`infer_layout` looks at the ops that produce and consume the
tensor — following it through element-wise ops, permutes and transposes — for one that fixes its channel axis:
convolutions and batch/group/instance norms (and timm's ``*2d`` norms) read channels first; ``Linear`` and
``LayerNorm`` read them last. Both directions must agree, or the layout is ``unknown`` and adapters that need it
refuse: a layout is never guessed from the rank. Token layouts also get the grid they were cut from, when the graph
shows a feature map of that many positions (plus a few class or register tokens in front) upstream.
"""

from __future__ import annotations

import math
import operator
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from graftnet import activations

__all__ = ["CHANNELS_FIRST", "CHANNELS_LAST", "TOKENS", "UNKNOWN", "VECTOR", "Layout", "infer_layout"]

CHANNELS_FIRST, CHANNELS_LAST, TOKENS = "channels_first", "channels_last", "tokens"
VECTOR, UNKNOWN = "vector", "unknown"
# Class, register and distillation tokens a token sequence may hold in front of its grid.
MAX_PREFIX_TOKENS = 16


@dataclass(frozen=True)
class Layout:
    """How a pre-activation (one sample, no batch dimension) is laid out.

    ``kind`` is one of ``channels_first`` (C, *spatial), ``channels_last`` (*spatial, C), ``tokens`` (N, D),
    ``vector`` (D,) or ``unknown``. For tokens, ``grid`` is the spatial grid the last ``N - prefix`` tokens were
    cut from (row-major), and ``prefix`` the class/register tokens in front of it; ``grid`` is None when the
    graph does not show one. A channels-first (C, L) tensor whose L positions are a flattened map upstream
    (EfficientViM) has that map's ``grid`` too.
    """

    kind: str
    grid: tuple[int, ...] | None = None
    prefix: int = 0

    def __str__(self) -> str:
        if self.grid is None:
            return self.kind
        grid = "×".join(map(str, self.grid))
        if self.kind == CHANNELS_FIRST:
            return f"channels_first (flattened {grid})"
        return f"tokens {grid}" + (f"+{self.prefix}" if self.prefix else "")

    @property
    def is_map(self) -> bool:
        """Whether the tensor can be read as a feature map (channels and a spatial grid)."""
        return self.kind in (CHANNELS_FIRST, CHANNELS_LAST) or (self.kind == TOKENS and self.grid is not None)


def default_layout(shape: tuple[int, ...] | None) -> Layout:
    """The layout a bare shape implies by PyTorch's convention: what adapters assume when no graph is known."""
    if shape is None or len(shape) < 1:
        return Layout(UNKNOWN)
    return Layout(VECTOR) if len(shape) == 1 else Layout(CHANNELS_FIRST)


# --- what fixes the channel axis -----------------------------------------------------------------------------

_FIRST_MODULES: tuple[type[nn.Module], ...] = (
    nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm,
)  # fmt: skip
_FIRST_FUNCTIONS: set[Callable[..., Any]] = {
    F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d, F.conv_transpose1d, F.conv_transpose2d,
    F.conv_transpose3d, F.batch_norm, F.group_norm, F.instance_norm,
}  # fmt: skip
_LAST_FUNCTIONS: set[Callable[..., Any]] = {F.linear, F.layer_norm, F.rms_norm}
_FIRST_NAMES = {"LayerNorm2d", "LayerNormAct2d", "LayerNorm2dFp32", "LayerNormExp2d", "RmsNorm2d", "RmsNorm2dFp32",
                "SimpleNorm2d", "SimpleNorm2dFp32", "GroupNorm1", "GroupNorm1Act"}  # fmt: skip
_LAST_NAMES = {"LayerNormAct", "RmsNorm", "RmsNormFp32", "SimpleNorm", "SimpleNormFp32", "LayerNormFp32"}


def _module_axis(m: nn.Module, rank: int) -> tuple[int, int | None] | None:
    """(channel axis, channel count) a module reads, for a tensor of ``rank`` dims without the batch."""
    names = {c.__name__ for c in type(m).__mro__}
    if names & _FIRST_NAMES:  # timm's 2d norms subclass nn.LayerNorm but normalise over channels first
        return 0, None
    if names & _LAST_NAMES:
        return rank - 1, None
    if isinstance(m, nn.modules.conv._ConvNd):
        return 0, None  # in and out channels differ: checked by the caller on the side it reads
    if isinstance(m, _FIRST_MODULES):
        return 0, getattr(m, "num_features", getattr(m, "num_channels", None))
    if isinstance(m, nn.Linear):
        return rank - 1, None
    if isinstance(m, nn.LayerNorm) and len(m.normalized_shape) == 1:
        return rank - 1, int(m.normalized_shape[0])
    return None


def _channels(node: fx.Node, root: nn.Module, *, reads: bool) -> tuple[int, int | None] | None:
    """The channel axis ``node``'s op fixes for its input (``reads``) or its output, with the count it implies."""
    shape = _shape(node.args[0]) if reads and node.args and isinstance(node.args[0], fx.Node) else _shape(node)
    if shape is None or not shape:
        return None
    rank = len(shape)
    if node.op == "call_module":
        m = root.get_submodule(str(node.target))
        found = _module_axis(m, rank)
        if found is None:
            return None
        axis, count = found
        if isinstance(m, nn.modules.conv._ConvNd):
            count = m.in_channels if reads else m.out_channels
        elif isinstance(m, nn.Linear):
            count = m.in_features if reads else m.out_features
        return axis, count
    if node.op == "call_function":
        if node.target in _FIRST_FUNCTIONS:
            return 0, None
        if node.target in _LAST_FUNCTIONS:
            return rank - 1, None
    return None


# --- what keeps it: element-wise ops, and permutes that move it ------------------------------------------------

_ELEMENTWISE_FUNCTIONS: set[Callable[..., Any]] = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.iadd, operator.isub,
    operator.imul, operator.itruediv, torch.add, torch.sub, torch.mul, torch.div, torch.neg, F.dropout,
    F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
}  # fmt: skip
_ELEMENTWISE_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "neg", "contiguous", "clone",
                        "float", "half", "bfloat16", "to", "type_as", "detach"}  # fmt: skip
_ELEMENTWISE_MODULES: tuple[type[nn.Module], ...] = (nn.Identity, nn.modules.dropout._DropoutNd)


def _shape(node: Any) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    shape = getattr(meta, "shape", None)
    return None if shape is None else tuple(int(d) for d in shape[1:])


def _elementwise(node: fx.Node, root: nn.Module) -> bool:
    if activations.is_activation(node, root):
        return True
    if node.op == "call_module":
        return isinstance(root.get_submodule(str(node.target)), _ELEMENTWISE_MODULES)
    if node.op == "call_function":
        return node.target in _ELEMENTWISE_FUNCTIONS
    if node.op == "call_method":
        return node.target in _ELEMENTWISE_METHODS
    return False


def _ints(values: Any) -> list[int] | None:
    if isinstance(values, list | tuple) and all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return [int(v) for v in values]
    return None


def _permutation(node: fx.Node) -> list[int] | None:
    """For a permute/transpose of a batched tensor: output sample axis k is input sample axis ``result[k]``."""
    shape = _shape(node)
    if shape is None:
        return None
    rank = len(shape) + 1  # with the batch
    args = list(node.args[1:])
    if (node.op, node.target) in (("call_method", "permute"), ("call_function", torch.permute)):
        given = args[0] if len(args) == 1 and isinstance(args[0], list | tuple) else args or node.kwargs.get("dims")
        dims = _ints(given)
        if dims is None or len(dims) != rank:
            return None
        full = [d % rank for d in dims]
    elif (node.op, node.target) in (("call_method", "transpose"), ("call_method", "swapaxes"),
                                    ("call_function", torch.transpose), ("call_function", torch.swapaxes)):  # fmt: skip
        pair = _ints(args)
        if pair is None or len(pair) != 2:
            return None
        a, b = (d % rank for d in pair)
        full = list(range(rank))
        full[a], full[b] = full[b], full[a]
    else:
        return None
    if full[0] != 0:  # the batch moved: no longer a per-sample layout
        return None
    return [d - 1 for d in full[1:]]


def _concatenates(node: fx.Node) -> bool:
    """``torch.cat`` along a sample axis (channels, tokens): the pieces share the result's layout."""
    if node.op != "call_function" or node.target is not torch.cat:
        return False
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    rank = len(_shape(node) or ()) + 1
    return isinstance(dim, int) and rank > 1 and dim % rank != 0


def _neighbours(node: fx.Node, root: nn.Module, upward: bool) -> Iterator[tuple[fx.Node, list[int] | None]]:
    """Tensors that share ``node``'s layout, one step up or down: (neighbour, its axis → ``node`` axis map)."""
    shape = _shape(node)
    if upward:
        if _elementwise(node, root):
            for a in node.all_input_nodes:
                if _shape(a) == shape and a.meta.get("batched") is not False:
                    yield a, None
            return
        if _concatenates(node):
            for a in node.all_input_nodes:
                if len(_shape(a) or ()) == len(shape or ()) and a.meta.get("batched") is not False:
                    yield a, None
            return
        perm = _permutation(node)
        if perm is not None and isinstance(node.args[0], fx.Node):
            inverse = [perm.index(k) for k in range(len(perm))]
            yield node.args[0], inverse  # input axis j is output axis inverse[j]
        return
    for user in node.users:
        if _elementwise(user, root) and _shape(user) == shape or _concatenates(user):
            yield user, None
            continue
        perm = _permutation(user)
        if perm is not None and user.args and user.args[0] is node:
            yield user, perm  # user axis k is node axis perm[k]


def _channel_axes(z: fx.Node, h: fx.Node, root: nn.Module, budget: int = 64) -> set[int]:
    """Every channel axis of ``z`` that the ops around it imply.

    The search walks the tensors that share z's layout — through element-wise ops, concatenations and
    permutes, up and down, starting at z and at h = act(z) — and asks of each what produced it and what reads it.
    """
    rank = len(_shape(z) or ())
    found: set[int] = set()
    queue: deque[tuple[fx.Node, list[int]]] = deque([(z, list(range(rank))), (h, list(range(rank)))])
    seen = {z, h}
    while queue and len(seen) <= budget:
        node, to_z = queue.popleft()  # to_z[k]: node's axis k is z's axis to_z[k]
        made = _channels(node, root, reads=False)
        if made is not None:
            _record(found, made, node, to_z)
        for user in node.users:
            read = _channels(user, root, reads=True)
            if read is not None and user.args and user.args[0] is node:
                _record(found, read, node, to_z)
        for upward in (True, False):
            for nxt, to_node in _neighbours(node, root, upward):
                if nxt not in seen:
                    seen.add(nxt)
                    queue.append((nxt, to_z if to_node is None else [to_z[j] for j in to_node]))
    return found


def _record(found: set[int], evidence: tuple[int, int | None], node: fx.Node, to_z: list[int]) -> None:
    axis, count = evidence
    shape = _shape(node)
    if shape is None or not 0 <= axis < len(to_z):
        return
    if count is not None and shape[axis] != count:
        return  # the op reads channels elsewhere than this tensor's axis (a Linear over another dim): no evidence
    found.add(to_z[axis])


def _grid(
    z: fx.Node, root: nn.Module, tokens: int, *, max_prefix: int = MAX_PREFIX_TOKENS, budget: int = 4000
) -> tuple[tuple[int, ...], int] | None:
    """The nearest upstream feature map with ``tokens - prefix`` positions (0 ≤ prefix ≤ ``max_prefix``)."""
    queue, seen = deque([z]), {z}
    while queue and len(seen) <= budget:
        node = queue.popleft()
        shape = _shape(node)
        if shape is not None and len(shape) >= 3 and node.meta.get("batched") is not False:
            made = _channels(node, root, reads=False)
            if made is not None and made[0] in (0, len(shape) - 1):
                spatial = shape[1:] if made[0] == 0 else shape[:-1]
                prefix = tokens - math.prod(spatial)
                if 0 <= prefix <= max_prefix and prefix < math.prod(spatial):
                    return tuple(spatial), prefix
        for a in node.all_input_nodes:
            if a not in seen:
                seen.add(a)
                queue.append(a)
    return None


def infer_layout(z: fx.Node, h: fx.Node, root: nn.Module) -> Layout:
    """The layout of pre-activation ``z``, whose activation's output is ``h`` (the same node for a fused module)."""
    shape = _shape(z)
    if shape is None or not shape:
        return Layout(UNKNOWN)
    if len(shape) == 1:
        return Layout(VECTOR)
    axes = _channel_axes(z, h, root)
    if len(axes) != 1:  # nothing fixes it, or two ops disagree: refuse rather than guess
        return Layout(UNKNOWN)
    axis = axes.pop()
    if axis == 0:
        if len(shape) == 2:  # (C, L): a map flattened to L positions, if the graph shows that map upstream
            flat = _grid(z, root, shape[1], max_prefix=0)
            if flat is not None:
                return Layout(CHANNELS_FIRST, flat[0])
        return Layout(CHANNELS_FIRST)
    if axis != len(shape) - 1:
        return Layout(UNKNOWN)
    if len(shape) > 2:
        return Layout(CHANNELS_LAST)
    found = _grid(z, root, shape[0])
    return Layout(TOKENS) if found is None else Layout(TOKENS, found[0], found[1])
