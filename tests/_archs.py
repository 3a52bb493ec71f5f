"""Hypothesis strategies for tiny random architectures and graft specs over them.

An architecture is plain data (:class:`Arch`: an input shape and a tuple of block descriptions);
:func:`build` turns it into a :class:`Net` whose ``forward`` interprets that description. The forward
branches only on the (Python) description and on ``self.training``, so torch.fx traces it.

Blocks cover what graftnet must survive: Linear, Conv1d and Conv2d, BatchNorm, Dropout as a module and as
``F.dropout(x, p, self.training)``, residual adds (``y = y + skip``, ``y += skip``, and — in ``unsafe``
architectures — ``skip += y``), ``torch.cat`` of branches, and activations as modules, functions and
Tensor methods, in place or not, including one activation module called twice.

``unsafe`` architectures may also write in place into tensors that other layers read (an in-place
activation straight on a block's input, in-place activations in a chain, ``skip += y``). Such models are
valid for forward passes but autograd may refuse their backward pass, so they are used for teachers
(which never run backward) and for forward-only student properties.

Everything is tiny (batch 4, ≤ 8 channels on 8×8 or 8/16-long maps, ≤ 16 features) so one example
runs in milliseconds.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

import graftnet

BATCH = 4
MAX_CHANNELS = 8
MAX_FEATURES = 16
N_OUT = 3

Shape = tuple[int, ...]

# --- activations ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Act:
    """An activation: ``form`` is 'module', 'function' or 'method'; ``fn`` names it."""

    form: str
    fn: str
    inplace: bool = False

    def __repr__(self) -> str:
        return f"Act({self.form}:{self.fn}{'!' if self.inplace else ''})"


# name -> (factory(inplace) or None, supports inplace)
_MODULE_ACTS: dict[str, tuple[Callable[[bool], nn.Module], bool]] = {
    "ReLU": (lambda ip: nn.ReLU(inplace=ip), True),
    "ReLU6": (lambda ip: nn.ReLU6(inplace=ip), True),
    "LeakyReLU": (lambda ip: nn.LeakyReLU(0.1, inplace=ip), True),
    "ELU": (lambda ip: nn.ELU(inplace=ip), True),
    "SiLU": (lambda ip: nn.SiLU(inplace=ip), True),
    "GELU": (lambda ip: nn.GELU(), False),
    "Tanh": (lambda ip: nn.Tanh(), False),
    "Sigmoid": (lambda ip: nn.Sigmoid(), False),
}


def _f_relu(x: torch.Tensor, ip: bool) -> torch.Tensor:
    return F.relu(x, inplace=True) if ip else F.relu(x)


def _f_relu_positional(x: torch.Tensor, ip: bool) -> torch.Tensor:
    return F.relu(x, True)  # the inplace flag passed positionally


def _f_leaky_relu(x: torch.Tensor, ip: bool) -> torch.Tensor:
    return F.leaky_relu(x, 0.1, inplace=True) if ip else F.leaky_relu(x, 0.1)


def _f_silu(x: torch.Tensor, ip: bool) -> torch.Tensor:
    return F.silu(x, inplace=True) if ip else F.silu(x)


def _f_elu(x: torch.Tensor, ip: bool) -> torch.Tensor:
    return F.elu(x, inplace=True) if ip else F.elu(x)


# name -> (apply(x, inplace), which inplace values it supports)
_FUNCTION_ACTS: dict[str, tuple[Callable[[torch.Tensor, bool], torch.Tensor], tuple[bool, ...]]] = {
    "F.relu": (_f_relu, (False, True)),
    "F.relu(x, True)": (_f_relu_positional, (True,)),
    "F.leaky_relu": (_f_leaky_relu, (False, True)),
    "F.silu": (_f_silu, (False, True)),
    "F.elu": (_f_elu, (False, True)),
    "F.gelu": (lambda x, ip: F.gelu(x), (False,)),
    "torch.relu": (lambda x, ip: torch.relu(x), (False,)),
    "torch.relu_": (lambda x, ip: torch.relu_(x), (True,)),
    "torch.sigmoid": (lambda x, ip: torch.sigmoid(x), (False,)),
    "torch.tanh": (lambda x, ip: torch.tanh(x), (False,)),
}
_METHOD_ACTS = ("relu", "sigmoid", "tanh")  # x.relu() / x.relu_() …

ALL_ACTS: tuple[Act, ...] = (
    *(Act("module", n, ip) for n, (_, can) in _MODULE_ACTS.items() for ip in ((False, True) if can else (False,))),
    *(Act("function", n, ip) for n, (_, ips) in _FUNCTION_ACTS.items() for ip in ips),
    *(Act("method", n, ip) for n in _METHOD_ACTS for ip in (False, True)),
)


def act_module(act: Act | None) -> nn.Module | None:
    """The module a module-form activation calls; None for the other forms."""
    if act is None or act.form != "module":
        return None
    return _MODULE_ACTS[act.fn][0](act.inplace)


def apply_act(act: Act, module: nn.Module | None, x: torch.Tensor) -> torch.Tensor:
    if act.form == "module":
        assert module is not None
        return module(x)  # type: ignore[no-any-return]
    if act.form == "function":
        return _FUNCTION_ACTS[act.fn][0](x, act.inplace)
    return getattr(x, act.fn + ("_" if act.inplace else ""))()  # type: ignore[no-any-return]


def activations(*, inplace: bool | None = None) -> st.SearchStrategy[Act]:
    """Any activation form; ``inplace`` restricts to in-place (True) or out-of-place (False) ones."""
    pool = [a for a in ALL_ACTS if inplace is None or a.inplace == inplace]
    return st.sampled_from(pool)


# --- block descriptions ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layer:
    """[flatten →] Linear/Conv → [BatchNorm] → act → [extra act] → [Dropout]."""

    out: int
    act: Act
    kernel: int = 1
    stride: int = 1
    bn: bool = False
    extra: Act | None = None
    dropout: str | None = None  # 'module' | 'functional'
    flatten: bool = False  # feature map → vector before the op


@dataclass(frozen=True)
class Residual:
    """``z = op1(x) [bn1]; h = act1(z) [extra1]; y = op2(h) [bn2]; y ⊕= skip; act2(y)``; channels kept.

    ``skip`` is the block input ``x`` or ``z`` (which an in-place ``act1`` has overwritten with h);
    ``add`` is 'add' (``y = y + skip``), 'iadd' (``y += skip``), 'add_' (``y.add_(skip)``), or, unsafe,
    'into_skip' (``skip += y``) and 'into_skip_' (``skip.add_(y)``). torch.fx records ``a += b`` as an
    out-of-place ``a + b`` (its Proxy has no ``__iadd__``); only the ``add_`` forms are in place in the graph.
    ``shared``: act1 and act2 are one module called twice (torchvision's BasicBlock).
    """

    act1: Act
    act2: Act
    kernel: int = 1
    bn: bool = False
    extra1: Act | None = None
    skip: str = "x"
    add: str = "add"
    shared: bool = False


@dataclass(frozen=True)
class Concat:
    """``torch.cat`` of branches along dim 1, then an optional activation. A bare :class:`Act` branch applies
    the activation straight to the block input."""

    branches: tuple[Layer | Act, ...]
    act: Act | None = None


Block = Layer | Residual | Concat


@dataclass(frozen=True)
class Arch:
    input_shape: Shape
    blocks: tuple[Block, ...]
    n_out: int = N_OUT


def _conv_len(n: int, kernel: int, stride: int) -> int:
    return (n + 2 * (kernel // 2) - kernel) // stride + 1


def block_shape(block: Block, shape: Shape) -> Shape:
    """The shape (no batch dim) a block produces from ``shape``."""
    if isinstance(block, Layer):
        if block.flatten or len(shape) == 1:
            return (block.out,)
        return (block.out, *(_conv_len(n, block.kernel, block.stride) for n in shape[1:]))
    if isinstance(block, Residual):
        return shape
    channels = sum(shape[0] if isinstance(b, Act) else b.out for b in block.branches)
    return (channels, *shape[1:])


def arch_shapes(arch: Arch) -> list[Shape]:
    shapes = [arch.input_shape]
    for b in arch.blocks:
        shapes.append(block_shape(b, shapes[-1]))
    return shapes


# --- modules that interpret the descriptions ------------------------------------------------------------


def _op(in_shape: Shape, out: int, kernel: int, stride: int) -> tuple[nn.Module, nn.Module]:
    """The Linear/Conv for ``in_shape`` and a matching BatchNorm."""
    rank = len(in_shape) - 1
    if rank == 0:
        return nn.Linear(in_shape[0], out), nn.BatchNorm1d(out)
    conv = (nn.Conv1d, nn.Conv2d)[rank - 1]
    bn = (nn.BatchNorm1d, nn.BatchNorm2d)[rank - 1]
    return conv(in_shape[0], out, kernel, stride=stride, padding=kernel // 2), bn(out)


def _dropout(x: torch.Tensor, how: str | None, module: nn.Module | None, training: bool) -> torch.Tensor:
    if how == "module":
        assert module is not None
        return module(x)  # type: ignore[no-any-return]
    if how == "functional":
        return F.dropout(x, 0.5, training)  # frozen at trace time unless traced in both modes
    return x


class LayerBlock(nn.Module):
    def __init__(self, cfg: Layer, in_shape: Shape) -> None:
        super().__init__()
        self.cfg = cfg
        shape = (math.prod(in_shape),) if cfg.flatten else in_shape
        self.op, bn = _op(shape, cfg.out, cfg.kernel, cfg.stride)
        self.bn = bn if cfg.bn else None
        self.act = act_module(cfg.act)
        self.extra = act_module(cfg.extra)
        self.drop = nn.Dropout(0.5) if cfg.dropout == "module" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        if cfg.flatten:
            x = torch.flatten(x, 1)
        x = self.op(x)
        if self.bn is not None:
            x = self.bn(x)
        x = apply_act(cfg.act, self.act, x)
        if cfg.extra is not None:
            x = apply_act(cfg.extra, self.extra, x)
        return _dropout(x, cfg.dropout, self.drop, self.training)


class ResidualBlock(nn.Module):
    def __init__(self, cfg: Residual, in_shape: Shape) -> None:
        super().__init__()
        self.cfg = cfg
        c = in_shape[0]
        self.op1, bn1 = _op(in_shape, c, cfg.kernel, 1)
        self.op2, bn2 = _op(in_shape, c, cfg.kernel, 1)
        self.bn1 = bn1 if cfg.bn else None
        self.bn2 = bn2 if cfg.bn else None
        if cfg.shared:
            self.act = act_module(cfg.act1)
        else:
            self.act1 = act_module(cfg.act1)
            self.act2 = act_module(cfg.act2)
        self.extra1 = act_module(cfg.extra1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        act1, act2 = (self.act, self.act) if cfg.shared else (self.act1, self.act2)
        z = self.op1(x)
        if self.bn1 is not None:
            z = self.bn1(z)
        h = apply_act(cfg.act1, act1, z)
        if cfg.extra1 is not None:
            h = apply_act(cfg.extra1, self.extra1, h)
        y = self.op2(h)
        if self.bn2 is not None:
            y = self.bn2(y)
        skip = x if cfg.skip == "x" else z
        if cfg.add == "into_skip":
            skip += y
            y = skip
        elif cfg.add == "into_skip_":
            y = skip.add_(y)
        elif cfg.add == "iadd":
            y += skip
        elif cfg.add == "add_":
            y = y.add_(skip)
        else:
            y = y + skip
        return apply_act(cfg.act2, act2, y)


class ConcatBlock(nn.Module):
    def __init__(self, cfg: Concat, in_shape: Shape) -> None:
        super().__init__()
        self.cfg = cfg
        branches: list[nn.Module] = []
        for b in cfg.branches:
            if isinstance(b, Act):
                branches.append(act_module(b) or nn.Identity())  # Identity: a placeholder, never called
            else:
                branches.append(LayerBlock(b, in_shape))
        self.branches = nn.ModuleList(branches)
        self.act = act_module(cfg.act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = []
        for b, module in zip(self.cfg.branches, self.branches, strict=True):
            outs.append(apply_act(b, module, x) if isinstance(b, Act) else module(x))
        y = torch.cat(outs, 1)
        if self.cfg.act is not None:
            y = apply_act(self.cfg.act, self.act, y)
        return y


class Net(nn.Module):
    """Runs ``arch.blocks`` in order, then flattens into a Linear head."""

    def __init__(self, arch: Arch) -> None:
        super().__init__()
        self.arch = arch
        shapes = arch_shapes(arch)
        blocks: list[nn.Module] = []
        for block, shape in zip(arch.blocks, shapes, strict=False):
            if isinstance(block, Layer):
                blocks.append(LayerBlock(block, shape))
            elif isinstance(block, Residual):
                blocks.append(ResidualBlock(block, shape))
            else:
                blocks.append(ConcatBlock(block, shape))
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Linear(math.prod(shapes[-1]), arch.n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(torch.flatten(x, 1))  # type: ignore[no-any-return]


def build(arch: Arch, seed: int) -> Net:
    """A :class:`Net` with seeded weights and non-trivial BatchNorm statistics; the global RNG is untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = Net(arch)
        with torch.no_grad():
            for m in net.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.running_mean.normal_(0.0, 0.3)  # type: ignore[union-attr]
                    m.running_var.uniform_(0.5, 2.0)  # type: ignore[union-attr]
                    m.weight.normal_(1.0, 0.2)
                    m.bias.normal_(0.0, 0.2)
    return net


def example_input(shape: Shape, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(BATCH, *shape, generator=g)


# --- strategies for descriptions -----------------------------------------------------------------------


def input_shapes() -> st.SearchStrategy[Shape]:
    """Vectors, Conv1d maps and Conv2d maps."""
    return st.one_of(
        st.tuples(st.integers(3, MAX_FEATURES)),
        st.tuples(st.integers(1, 4), st.sampled_from([8, 16])),
        st.tuples(st.integers(1, 3), st.just(8), st.just(8)),
    )


def _limit(shape: Shape) -> int:
    return MAX_FEATURES if len(shape) == 1 else MAX_CHANNELS


def _width(shape: Shape, hi: int | None = None) -> st.SearchStrategy[int]:
    return st.integers(1, hi if hi is not None else _limit(shape))


@st.composite
def layers(draw: st.DrawFn, shape: Shape, *, unsafe: bool, flatten: bool = False, strided: bool = True,
           out: int | None = None) -> Layer:  # fmt: skip
    is_map = len(shape) > 1 and not flatten
    kernel = draw(st.sampled_from([1, 3])) if is_map else 1
    can_stride = strided and is_map and min(shape[1:]) >= 4
    stride = draw(st.sampled_from([1, 2])) if can_stride else 1
    act = draw(activations())
    # Chained in-place activations make autograd refuse the backward pass: unsafe models only.
    extra = draw(st.none() | activations(inplace=None if unsafe else False))
    return Layer(
        out=out if out is not None else draw(_width((1,) if flatten else shape)),
        act=act,
        kernel=kernel,
        stride=stride,
        bn=draw(st.booleans()),
        extra=extra,
        dropout=draw(st.sampled_from([None, None, "module", "functional"])),
        flatten=flatten,
    )


SAFE_ADDS = ("add", "iadd", "add_")
ADDS = (*SAFE_ADDS, "into_skip", "into_skip_")


@st.composite
def residuals(draw: st.DrawFn, shape: Shape, *, unsafe: bool) -> Residual:
    shared = draw(st.booleans())
    act1 = draw(st.sampled_from([a for a in ALL_ACTS if a.form == "module"]) if shared else activations())
    act2 = act1 if shared else draw(activations())
    add = draw(st.sampled_from(ADDS if unsafe else SAFE_ADDS))
    return Residual(
        act1=act1,
        act2=act2,
        kernel=draw(st.sampled_from([1, 3])) if len(shape) > 1 else 1,
        bn=draw(st.booleans()),
        extra1=draw(st.none() | activations(inplace=None if unsafe else False)),
        skip=draw(st.sampled_from(["x", "z"])),
        add=add,
        shared=shared,
    )


@st.composite
def concats(draw: st.DrawFn, shape: Shape, *, unsafe: bool) -> Concat:
    limit = max(_limit(shape), shape[0] + 1)
    branches: list[Layer | Act] = []
    used = 0
    if draw(st.booleans()):
        # An activation straight on the block input: in place it writes into a tensor the other branch reads.
        branches.append(draw(activations(inplace=None if unsafe else False)))
        used = shape[0]
    n_layers = 1 if branches else draw(st.integers(1, 2))
    for i in range(n_layers):
        left = n_layers - i - 1
        hi = limit - used - left
        w = draw(_width(shape, hi))
        branches.append(draw(layers(shape, unsafe=unsafe, strided=False, out=w)))
        used += w
    order = draw(st.permutations(range(len(branches))))
    return Concat(tuple(branches[i] for i in order), act=draw(st.none() | activations()))


@st.composite
def archs(draw: st.DrawFn, input_shape: Shape, *, unsafe: bool = False, max_blocks: int = 4) -> Arch:
    """A random architecture for ``input_shape``. A map architecture never flattens in its first block, so it
    always has a feature-map activation (any student site can take a tap from it with the ``auto`` adapter)."""
    n = draw(st.integers(1, max_blocks))
    shape = input_shape
    blocks: list[Block] = []
    for i in range(n):
        # A map architecture does not flatten first: its first block has feature-map activations.
        can_flatten = len(shape) > 1 and i > 0
        kind = draw(st.sampled_from(["layer", "layer", "residual", "concat"] + (["flatten"] if can_flatten else [])))
        if kind == "layer":
            block: Block = draw(layers(shape, unsafe=unsafe))
        elif kind == "flatten":
            block = draw(layers(shape, unsafe=unsafe, flatten=True))
        elif kind == "residual":
            block = draw(residuals(shape, unsafe=unsafe))
        else:
            block = draw(concats(shape, unsafe=unsafe))
        blocks.append(block)
        shape = block_shape(block, shape)
    return Arch(input_shape, tuple(blocks))


# --- patterns of fixed graftnet bugs (regression tests in tests/test_properties.py) ----------------------


def writes_into_its_input(arch: Arch) -> bool:
    """Whether the model writes into its input tensor in place (first block: a bare in-place activation
    branch, or ``x.add_(y)`` on the block input). A *teacher* doing so changes the student's input."""
    first = arch.blocks[0]
    if isinstance(first, Concat):
        return any(isinstance(b, Act) and b.inplace for b in first.branches)
    return isinstance(first, Residual) and first.add == "into_skip_" and first.skip == "x"


def overwrites_a_tap_through_an_alias(arch: Arch) -> bool:
    """Whether a pre-activation is later overwritten through an *earlier* alias of it: ``h = relu_(z)``
    (h aliases z), ``extra1(h)`` reads h, then ``z.add_(y)``. Tapping ``extra1`` in a teacher returns
    the overwritten values."""
    return any(
        isinstance(b, Residual) and b.add == "into_skip_" and b.skip == "z" and b.act1.inplace and b.extra1 is not None
        for b in arch.blocks
    )


# --- graft cases ----------------------------------------------------------------------------------------


def auto_can_map(tap: Shape, site: Shape) -> bool:
    """Whether adapter 'auto' maps ``tap`` onto ``site`` (README "The spec", adapters)."""
    if tap == site or (len(tap) == 1 and len(site) == 1):
        return True
    is_map = 2 <= len(tap) <= 4
    return is_map and (len(site) == len(tap) or len(site) == 1)


@dataclass
class Case:
    """A student, teachers ``t0``/``t1``, an input batch and a spec over their sites."""

    student_arch: Arch
    teacher_archs: dict[str, Arch]
    seed: int
    spec: dict[str, Any]
    student: Net = field(repr=False)
    teachers: dict[str, Net] = field(repr=False)
    x: torch.Tensor = field(repr=False)
    student_sites: list[graftnet.SiteInfo] = field(repr=False)
    teacher_sites: dict[str, list[graftnet.SiteInfo]] = field(repr=False)

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(repr(self))  # hypothesis would otherwise print every field, modules and tensors included

    @property
    def chosen_sites(self) -> list[graftnet.SiteInfo]:
        by_name = {s.name: s for s in self.student_sites}
        return [by_name[s["student"]] for s in self.spec["sites"]]

    def taps_of(self, teacher: str) -> list[graftnet.SiteInfo]:
        """The distinct activations of ``teacher`` the spec taps, in the teacher's execution order."""
        names = {t.partition(":")[2] for s in self.spec["sites"] for t in s["taps"] if t.startswith(teacher + ":")}
        return [s for s in self.teacher_sites[teacher] if s.name in names]


@st.composite
def graft_cases(draw: st.DrawFn, *, unsafe_student: bool = False, max_sites: int = 3, max_teachers: int = 2,
                mixing: st.SearchStrategy[dict[str, Any]] | None = None) -> Case:  # fmt: skip
    """A random graft: a student, one or two (unsafe) teachers of the same input shape, and a spec mapping
    1..``max_sites`` student sites to 1–2 taps each that adapter ``auto`` can map."""
    shape = draw(input_shapes())
    student_arch = draw(archs(shape, unsafe=unsafe_student))
    teacher_archs = {f"t{i}": draw(archs(shape, unsafe=True)) for i in range(draw(st.integers(1, max_teachers)))}
    seed = draw(st.integers(0, 2**16))
    x = example_input(shape, seed)
    student = build(student_arch, seed)
    teachers = {name: build(a, seed + 1 + i).eval() for i, (name, a) in enumerate(teacher_archs.items())}
    # Clones: an unsafe model may write into its input, and shape propagation runs it on the example.
    student_sites = graftnet.sites(student, example_input=x.clone())
    teacher_sites = {name: graftnet.sites(t, example_input=x.clone()) for name, t in teachers.items()}
    # Half the time only in-place sites, where aliasing makes splicing hard, when the student has any.
    inplace = [s for s in student_sites if s.inplace]
    pool = inplace if inplace and draw(st.booleans()) else student_sites
    chosen = draw(st.lists(st.sampled_from(pool), min_size=1, max_size=max_sites, unique_by=lambda s: s.name))
    spec_sites = []
    for site in chosen:
        assert site.shape is not None
        options = [f"{name}:{t.name}" for name, ts in teacher_sites.items() for t in ts
                   if t.shape is not None and auto_can_map(t.shape, site.shape)]  # fmt: skip
        taps = draw(st.lists(st.sampled_from(options), min_size=1, max_size=2, unique=True))
        spec_sites.append({"student": site.name, "taps": taps})
    spec: dict[str, Any] = {"sites": spec_sites, "adapter": "auto"}
    if mixing is not None:
        spec["mixing"] = draw(mixing)
    return Case(student_arch, teacher_archs, seed, spec, student, teachers, x, student_sites, teacher_sites)
