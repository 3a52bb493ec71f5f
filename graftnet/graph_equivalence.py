"""FX graphs as networkx graphs, and an isomorphism check between them.

Two graphs are equivalent when some one-to-one map between their nodes keeps every node's label and
every edge: the label captures the op, a normalised target (module *type* and configuration for
``call_module``, the qualified function for ``call_function``, the method name, the attribute path) and
the argument structure (constants kept, each node argument replaced by its position in the arguments).

Examples:
    >>> import torch, torch.fx as fx
    >>> a = fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU()))
    >>> b = fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU()))
    >>> is_isomorphic(a, b)
    True
"""

from __future__ import annotations

from typing import Any

import networkx as nx
import torch
import torch.fx as fx
from torch import nn

__all__ = ["is_isomorphic", "node_label", "to_networkx"]


def _target(node: fx.Node, root: nn.Module | None) -> str:
    if node.op == "call_module" and root is not None:
        module = root.get_submodule(str(node.target))
        return f"{type(module).__module__}.{type(module).__qualname__}({module.extra_repr()})"
    if node.op == "get_attr" and root is not None:
        value = _fetch(root, str(node.target))
        if isinstance(value, torch.Tensor):
            return f"tensor{tuple(value.shape)}:{value.dtype}"
        return type(value).__qualname__
    if node.op == "call_function":
        target = node.target
        name = getattr(target, "__qualname__", getattr(target, "__name__", target))
        return f"{getattr(target, '__module__', '')}.{name}"
    return str(node.target)


def _fetch(root: nn.Module, path: str) -> object:
    value: object = root
    for part in path.split("."):
        value = getattr(value, part)
    return value


def _structure(value: Any, edges: list[tuple[fx.Node, str]], where: str) -> Any:
    """The argument's shape with nodes replaced by ``'<node>'`` and recorded as edges (with their position)."""
    if isinstance(value, fx.Node):
        edges.append((value, where))
        return "<node>"
    if isinstance(value, (tuple, list)):
        return type(value).__name__, tuple(_structure(v, edges, f"{where}.{i}") for i, v in enumerate(value))
    if isinstance(value, dict):
        return "dict", tuple((k, _structure(v, edges, f"{where}.{k}")) for k, v in sorted(value.items()))
    if isinstance(value, slice):
        return "slice", tuple(_structure(v, edges, f"{where}.{k}") for k, v in
                              (("start", value.start), ("stop", value.stop), ("step", value.step)))  # fmt: skip
    return repr(value)


def node_label(node: fx.Node, root: nn.Module | None = None) -> tuple[str, str, Any]:
    """(op, normalised target, argument structure) — what two matched nodes must share."""
    edges: list[tuple[fx.Node, str]] = []
    structure = (_structure(node.args, edges, "args"), _structure(dict(node.kwargs), edges, "kwargs"))
    target = "placeholder" if node.op == "placeholder" else _target(node, root)
    return node.op, target, repr(structure)


def to_networkx(graph: fx.Graph | fx.GraphModule, root: nn.Module | None = None) -> nx.MultiDiGraph:
    """A MultiDiGraph with one node per FX node (attribute ``label``) and one edge per use (attribute ``arg``)."""
    if isinstance(graph, fx.GraphModule):
        root = graph if root is None else root
        graph = graph.graph
    out = nx.MultiDiGraph()
    for node in graph.nodes:
        out.add_node(node.name, label=node_label(node, root))
        edges: list[tuple[fx.Node, str]] = []
        _structure(node.args, edges, "args")
        _structure(dict(node.kwargs), edges, "kwargs")
        for source, where in edges:
            out.add_edge(source.name, node.name, arg=where)
    return out


def is_isomorphic(a: fx.Graph | fx.GraphModule | nn.Module, b: fx.Graph | fx.GraphModule | nn.Module) -> bool:
    """Whether two FX graphs (or modules, traced with graftnet's tracer) compute the same thing structurally.

    A bare ``fx.Graph`` is labelled with its ``owning_module`` when it has one (a grafted model's
    ``g.graph`` has), so modules compare by type and configuration rather than by path.
    """
    ga, gb = (_as_networkx(x) for x in (a, b))
    if ga.number_of_nodes() != gb.number_of_nodes() or ga.number_of_edges() != gb.number_of_edges():
        return False
    return bool(nx.is_isomorphic(ga, gb, node_match=lambda x, y: x["label"] == y["label"],
                                 edge_match=_edges_match))  # fmt: skip


def _edges_match(x: dict[Any, dict[str, Any]], y: dict[Any, dict[str, Any]]) -> bool:
    return sorted(e["arg"] for e in x.values()) == sorted(e["arg"] for e in y.values())


def _as_networkx(x: fx.Graph | fx.GraphModule | nn.Module) -> nx.MultiDiGraph:
    if isinstance(x, fx.GraphModule):
        return to_networkx(x)
    if isinstance(x, fx.Graph):
        return to_networkx(x, x.owning_module)
    from graftnet._trace import trace

    traced = trace(x, training_modes=(x.training,))
    return to_networkx(traced.eval_graph, traced.model)
