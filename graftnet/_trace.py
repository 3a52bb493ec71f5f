"""Leaf-aware FX tracing that stays faithful to the model in both training modes.

Two things make a plain ``symbolic_trace`` unfaithful (docs/architecture.md, "Facts the design rests on"):

* code that branches on ``self.training`` inside a traced-through module is frozen at trace time
  (timm's drop-path, a model's own ``if self.training:``). We trace twice, once per mode, and keep
  both graphs when they differ — torchvision's ``DualGraphModule`` idea;
* modules FX cannot trace, and fused norm+act modules whose own forward must run (BatchNorm buffer
  updates), are kept as leaves: torch.nn layers, timm's no-trace set, registered fused and activation
  modules, and anything passed to :func:`register_leaf_module`.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from graftnet import activations
from graftnet.errors import TraceError

__all__ = ["Traced", "register_leaf_module", "trace"]

_LEAVES: set[type[nn.Module]] = set()
_TIMM_LEAVES: set[type[nn.Module]] = set()
_AUTOWRAP: set[Callable[..., Any]] = set()

try:  # timm's own list of what FX cannot trace through
    from timm.layers import _fx as _timm_fx

    _TIMM_LEAVES.update(_timm_fx.get_notrace_modules())
    _LEAVES.update(_TIMM_LEAVES)
    _AUTOWRAP.update(_timm_fx.get_notrace_functions())
except ImportError:  # pragma: no cover - timm is a dependency, but user code need not use it
    pass


def register_leaf_module(cls: type[nn.Module]) -> type[nn.Module]:
    """Trace calls to ``cls`` as one opaque node (usable as a decorator).

    Use it for modules FX cannot trace (data-dependent control flow, ``torch.utils.checkpoint``…).
    Activations inside a leaf cannot be sites or taps.
    """
    _LEAVES.add(cls)
    return cls


def why_leaf(module: nn.Module) -> str:
    """Why tracing keeps ``module`` closed, as a clause for error messages."""
    cls = type(module)
    name = f"{cls.__module__}.{cls.__qualname__}"
    if any(c in _TIMM_LEAVES for c in cls.__mro__):
        return f"timm lists {name} among the modules FX cannot trace"
    if isinstance(module, tuple(_LEAVES)):
        return f"{name} was registered with graftnet.register_leaf_module"
    if cls.__module__.startswith("torch.nn"):
        return f"FX keeps torch.nn modules such as {name} closed"
    return f"FX keeps {name} closed"


class _Tracer(fx.Tracer):
    def __init__(self) -> None:
        super().__init__(autowrap_functions=tuple(_AUTOWRAP))
        self.failed_in: tuple[str, type[nn.Module]] | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, tuple(_LEAVES)) or isinstance(m, activations.activation_modules()):
            return True
        if activations.activation_attr_of_fused(m) is not None:
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(
        self, m: nn.Module, forward: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:  # the innermost module is the first to see the exception
                self.failed_in = (self.path_of_module(m), type(m))
            raise


@dataclass(frozen=True)
class Traced:
    """A model and its FX graphs, one per training mode (the same object when the modes agree)."""

    model: nn.Module
    train_graph: fx.Graph
    eval_graph: fx.Graph

    @property
    def dual(self) -> bool:
        return self.train_graph is not self.eval_graph

    def graph(self, training: bool) -> fx.Graph:
        return self.train_graph if training else self.eval_graph

    def graphs(self) -> Iterator[tuple[bool, fx.Graph]]:
        yield False, self.eval_graph
        if self.dual:
            yield True, self.train_graph


@contextlib.contextmanager
def training_mode(model: nn.Module, mode: bool) -> Iterator[None]:
    """Put every submodule in ``mode``, then restore each one's own flag."""
    saved = [(m, m.training) for m in model.modules()]
    model.train(mode)
    try:
        yield
    finally:
        for m, flag in saved:
            m.training = flag


def _trace_once(model: nn.Module, name: str) -> fx.Graph:
    tracer = _Tracer()
    try:
        return tracer.trace(model)
    except Exception as e:
        where = "its top-level forward"
        leaf_hint = ""
        if tracer.failed_in is not None:
            path, cls = tracer.failed_in
            where = f"module {path!r} ({cls.__module__}.{cls.__qualname__})"
            leaf_hint = (
                f" If that module cannot be traced, mark it as a leaf: "
                f"graftnet.register_leaf_module({cls.__qualname__}) — it then runs as one opaque call "
                "and activations inside it cannot be sites or taps."
            )
        raise TraceError(
            f"torch.fx cannot trace {name}: it failed in {where}: {type(e).__name__}: {e}.{leaf_hint} "
            "Data-dependent Python control flow (if/for on tensor values) is the usual cause."
        ) from e


def trace(model: nn.Module, *, name: str = "the model", training_modes: tuple[bool, ...] = (True, False)) -> Traced:
    """Trace ``model`` in each of ``training_modes`` and keep one graph per mode when they differ."""
    graphs: dict[bool, fx.Graph] = {}
    for mode in training_modes:
        with training_mode(model, mode):
            graphs[mode] = _trace_once(model, name)
    eval_graph = graphs.get(False, graphs.get(True))
    train_graph = graphs.get(True, eval_graph)
    assert eval_graph is not None and train_graph is not None
    if train_graph is not eval_graph and _same_code(train_graph, eval_graph):
        train_graph = eval_graph
    return Traced(model, train_graph, eval_graph)


def _same_code(a: fx.Graph, b: fx.Graph) -> bool:
    return bool(a.python_code("self").src == b.python_code("self").src)


def shape_of(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return None if shape is None else tuple(int(d) for d in shape[1:])


def follows_batch(node: fx.Node) -> bool:
    """Whether ``node``'s output has the batch as its first dimension (unknown counts as yes).

    False for a tensor computed once for every sample, such as a relative-position MLP over a coordinate table,
    or one whose first dimension merges the batch with something else (tnt's inner tokens, batch × patches).
    """
    return node.meta.get("batched") is not False


def _first_dims(graph: fx.Graph) -> dict[str, int]:
    dims = {}
    for n in graph.nodes:
        shape = getattr(n.meta.get("tensor_meta"), "shape", None)
        if shape is not None and len(shape) > 0:
            dims[n.name] = int(shape[0])
    return dims


def _mismatch(model: nn.Module, example: tuple[torch.Tensor, ...], name: str) -> str:
    """Why ``model`` may have failed on ``example`` when its weights and the input differ in dtype or device, or ""."""
    weights = [t for t in itertools.chain(model.parameters(), model.buffers()) if t.is_floating_point()]
    inputs = [t for t in example if t.is_floating_point()]
    fixes = {"dtype": "model.float(), say; train.precision bf16 or fp16 autocasts them instead",
             "device": "model.to(device)"}  # fmt: skip
    for what, fix in fixes.items():
        theirs, given = {str(getattr(t, what)) for t in weights}, {str(getattr(t, what)) for t in inputs}
        if theirs and given and not theirs & given:
            return (
                f"the weights of {name} are {' and '.join(sorted(theirs))} but its input is "
                f"{' and '.join(sorted(given))}: the student and every teacher run on one input, so give them one "
                f"{what} ({fix})"
            )
    return ""


def propagate_shapes(
    traced: Traced, example: tuple[torch.Tensor, ...], *, name: str = "the model", hint: str = ""
) -> None:
    """Record each node's output shape (``node.meta['tensor_meta']``) by running the eval graph once, and
    whether its first dimension is the batch (``node.meta['batched']``) by running it again on one more sample."""
    from torch.fx.passes.shape_prop import ShapeProp

    module = fx.GraphModule(traced.model, traced.eval_graph)
    with training_mode(traced.model, False), torch.no_grad():
        try:
            ShapeProp(module).propagate(*example)
        except Exception as e:
            shapes = ", ".join(str(tuple(t.shape)) for t in example)
            failed = f"running {name} on an example input of shape {shapes} failed"
            if why := _mismatch(traced.model, example, name):
                raise TraceError(f"{failed}: {why}. ({type(e).__name__}: {e})") from e
            raise TraceError(
                f"{failed}: {type(e).__name__}: {e}. "
                + (hint or "Check input_shape in the spec (one sample, no batch dimension) or pass example_input.")
            ) from e
        metas = {n.name: n.meta.get("tensor_meta") for n in traced.eval_graph.nodes}
        batch = example[0].shape[0]
        first = _first_dims(traced.eval_graph)
        # One sample more: a dimension that grows with it is the batch; one that does not is computed once for
        # every sample (or merges the batch with something else) and cannot be mixed sample by sample.
        bigger = tuple(torch.cat([t, t[:1]]) if t.dim() and t.shape[0] == batch else t for t in example)
        try:
            ShapeProp(module).propagate(*bigger)
            second: dict[str, int] | None = _first_dims(traced.eval_graph)
        except Exception:  # a model that runs at one batch size only: nothing to learn, keep the first run
            second = None
        for n in traced.eval_graph.nodes:
            if metas[n.name] is None:
                n.meta.pop("tensor_meta", None)
            else:
                n.meta["tensor_meta"] = metas[n.name]
            if second is not None and n.name in first:
                n.meta["batched"] = first[n.name] == batch and second.get(n.name) == batch + 1
    if traced.dual:  # shapes do not depend on the mode: copy them over by node name
        by_name = {n.name: n.meta for n in traced.eval_graph.nodes}
        for n in traced.train_graph.nodes:
            meta = by_name.get(n.name)
            if meta is not None and meta.get("tensor_meta") is not None:
                n.meta["tensor_meta"] = meta["tensor_meta"]
                if "batched" in meta:
                    n.meta["batched"] = meta["batched"]
