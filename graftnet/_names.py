"""Names of graftable activations (README "Names") and their resolution.

Every activation call in a traced model gets one public name:

* an activation module called once: its module path (``layer1.0.act2``);
* an activation module called several times: ``path@0``, ``path@1`` … in call order
  (torchvision's BasicBlock calls ``self.relu`` twice); the bare path is then ambiguous;
* the activation inside a fused norm+act module: ``path.act`` (``features.denseblock1.denselayer1.norm1.act``);
* a functional or method activation: its FX node name (``relu_3``);
* the model's output, when it returns one tensor: ``output`` (the logits, mixed before they are returned).

A parent module path (``layer1.0``) resolves to the last activation that runs inside it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch.fx as fx
from torch import nn

from graftnet import activations
from graftnet._trace import Traced, follows_batch, shape_of, why_leaf
from graftnet.errors import NameResolutionError
from graftnet.layouts import UNKNOWN, Layout, infer_layout
from graftnet.registry import closest

__all__ = ["Activation", "catalogue", "resolve"]


@dataclass(frozen=True)
class Activation:
    """One activation call: its public name, where it sits in the graph, and its pre-activation shape."""

    name: str
    node: str  # FX node name of the activation call, or of the fused module call
    scope: str  # module path it runs in, for parent-path resolution
    kind: str  # what applies it, for listings: 'ReLU', 'F.relu', '.relu()', 'BatchNormAct2d.act'
    fused_attr: str | None  # set when the activation is the last step of a fused norm+act module
    inplace: bool
    shape: tuple[int, ...] | None  # pre-activation z, without the batch dimension
    batched: bool = True  # False: z has no batch dimension (computed once for all samples): not graftable
    layout: Layout = Layout(UNKNOWN)  # which axis holds the channels, read from the ops around z


def _kind(node: fx.Node, root: nn.Module) -> str:
    if node.op == "call_module":
        return type(root.get_submodule(str(node.target))).__name__
    if node.op == "call_method":
        return f".{node.target}()"
    target = node.target
    module = getattr(target, "__module__", "") or ""
    prefix = "F." if module.endswith("functional") else "torch."
    return prefix + getattr(target, "__name__", str(target))


def _scope(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path, _cls = list(stack.values())[-1]
    return str(path)


def catalogue(traced: Traced, training: bool = False) -> list[Activation]:
    """All activations of ``traced`` in execution order (shapes filled if shapes were propagated)."""
    graph = traced.graph(training)
    root = traced.model
    found: list[tuple[str, fx.Node, str | None]] = []  # (base name, node, fused attr)
    for node in graph.nodes:
        if node.op == "call_module":
            module = root.get_submodule(str(node.target))
            attr = activations.activation_attr_of_fused(module)
            if attr is not None:
                found.append((f"{node.target}.{attr}", node, attr))
                continue
        if activations.is_activation(node, root):
            base = str(node.target) if node.op == "call_module" else node.name
            found.append((base, node, None))
    calls = Counter(base for base, _, _ in found)
    seen: Counter[str] = Counter()
    result = []
    for base, node, attr in found:
        name = base if calls[base] == 1 else f"{base}@{seen[base]}"
        seen[base] += 1
        if attr is not None:
            module = root.get_submodule(str(node.target))
            kind = f"{type(module).__name__}.{attr}"
            inplace = getattr(getattr(module, attr), "inplace", False) is True
            shape = shape_of(node)
            batched = follows_batch(node)
            layout = infer_layout(node, node, root)  # the fused norm fixes it, and keeps z's layout
            scope = base
        else:
            kind = _kind(node, root)
            inplace = activations.mutates_input(node, root)
            z = node.args[0] if node.args else None
            shape = shape_of(z) if isinstance(z, fx.Node) else None
            batched = follows_batch(z) if isinstance(z, fx.Node) else True
            layout = infer_layout(z, node, root) if isinstance(z, fx.Node) else Layout(UNKNOWN)
            scope = str(node.target) if node.op == "call_module" else _scope(node)
        result.append(Activation(name, node.name, scope, kind, attr, inplace, shape, batched, layout))
    output = _output_site(graph, root)
    if output is not None and all(a.name != output.name for a in result):
        result.append(output)
    return result


def _output_site(graph: fx.Graph, root: nn.Module) -> Activation | None:
    """The model's output as a site or tap, when it is one tensor: mixing the student's logits with a teacher's
    (the paper's Table 4 student also learns from its teacher's output layer). The ``output`` node stands for
    the activation: z is what it returns."""
    node = next(n for n in reversed(graph.nodes) if n.op == "output")
    z = node.args[0] if node.args else None
    if not isinstance(z, fx.Node) or shape_of(z) is None:
        return None  # a tuple or a dict (actor-critics, detection heads): no single output to mix
    return Activation("output", node.name, "", "output", None, False, shape_of(z), follows_batch(z),
                      infer_layout(z, z, root))  # fmt: skip


def resolve(query: str, acts: list[Activation], traced: Traced, *, model_name: str, where: str) -> Activation:
    """The one activation ``query`` names in ``acts``.

    Raises:
        NameResolutionError: unknown, ambiguous, or not an activation; lists the closest valid names.
    """
    hint = f"Run `graftnet nodes` to list the graftable names of {model_name}."
    by_name = {a.name: a for a in acts}
    by_node = {a.node: a for a in acts if a.fused_attr is None}
    found = by_name.get(query) or by_node.get(query)
    if found is not None:
        if not found.batched:
            batched = closest(query, [a.name for a in acts if a.batched])
            suggest = f" Closest graftable names: {', '.join(batched)}." if batched else ""
            raise NameResolutionError(
                f"{where}: {query!r} in {model_name} runs on a tensor without the batch dimension (its first "
                "dimension does not follow the batch size: a table computed once for every sample, such as a "
                "relative-position MLP, or the batch merged with another dimension), so it cannot be mixed sample "
                f"by sample and is not a graftable name.{suggest} {hint}"
            )
        return found
    repeated = [a.name for a in acts if a.name.startswith(query + "@")]
    if repeated:
        raise NameResolutionError(
            f"{where}: {query!r} in {model_name} is an activation module called {len(repeated)} times; "
            f"name one call: {', '.join(repeated)}. {hint}"
        )
    within = [a for a in acts if a.scope.startswith(query + ".") or a.scope == query]
    inside = [a for a in within if a.batched]
    if inside:
        return inside[-1]
    if within:
        raise NameResolutionError(
            f"{where}: every activation inside {query!r} in {model_name} ({', '.join(a.name for a in within[:3])}"
            f"{' …' if len(within) > 3 else ''}) runs on a tensor without the batch dimension, computed once for "
            f"every sample, so none can be mixed sample by sample. {hint}"
        )
    try:
        module = traced.model.get_submodule(query) if query else None
    except AttributeError:
        module = None
    if module is not None:
        leaf = _enclosing_leaf(query, traced)
        if leaf is not None and (_composite(leaf, traced) or isinstance(module, activations.activation_modules())):
            raise NameResolutionError(_inside_leaf(query, module, [leaf], acts, traced, model_name, where) + f" {hint}")
        calls = [n for n in traced.eval_graph.nodes if n.op == "call_module"]
        leaves = [n for n in calls if str(n.target).startswith(query + ".") and _composite(n, traced)]
        if leaves:
            raise NameResolutionError(_inside_leaf(query, module, leaves, acts, traced, model_name, where) + f" {hint}")
        raise NameResolutionError(
            f"{where}: {query!r} in {model_name} is a {type(module).__name__} module with no activation that "
            f"runs inside it. {hint}"
        )
    node = next((n for n in traced.eval_graph.nodes if n.name == query), None)
    if node is not None and node.op == "output":
        returned = type(node.args[0]).__name__ if node.args else "nothing"
        raise NameResolutionError(
            f"{where}: 'output' in {model_name} cannot be mixed: it returns a {returned}, not one tensor (an "
            f"actor-critic's (policy, value), say); name an activation instead. {hint}"
        )
    if node is not None:
        raise NameResolutionError(
            f"{where}: {query!r} in {model_name} is a graph node ({node.op} {node.target}) but not an activation; "
            f"sites and taps are activations, named by their input. {hint}"
        )
    parents = {a.scope.rsplit(".", k)[0] for a in acts for k in range(1, a.scope.count(".") + 1)}
    near = closest(query, [a.name for a in acts if a.batched] + sorted(parents))
    near_text = f" Closest valid names: {', '.join(near)}." if near else ""
    raise NameResolutionError(f"{where}: {query!r} is not a graftable name in {model_name}.{near_text} {hint}")


def _enclosing_leaf(path: str, traced: Traced) -> fx.Node | None:
    """The module call that runs ``path`` as one opaque node: ``path`` itself or its nearest called parent."""
    called = {str(n.target): n for n in traced.eval_graph.nodes if n.op == "call_module"}
    parts = path.split(".")
    for k in range(len(parts), 0, -1):
        node = called.get(".".join(parts[:k]))
        if node is not None:
            return node
    return None


def _composite(leaf: fx.Node, traced: Traced) -> bool:
    """Whether a leaf call runs a block of submodules (which may hold activations), not a single layer."""
    return any(True for _ in traced.model.get_submodule(str(leaf.target)).children())


def _inside_leaf(
    query: str, module: nn.Module, leaves: list[fx.Node], acts: list[Activation], traced: Traced, model_name: str,
    where: str,
) -> str:  # fmt: skip
    """Why ``query`` — a leaf module, an activation inside one, or a module made of leaves — holds no graftable
    activation, and the graftable names just before and after those leaves."""
    root = traced.model
    first = root.get_submodule(str(leaves[0].target))
    cls = type(first)
    order = {n.name: i for i, n in enumerate(traced.eval_graph.nodes)}
    start, end = order[leaves[0].name], order[leaves[-1].name]
    batched = [a for a in acts if a.batched and a.node in order]
    near = [a.name for a in batched if order[a.node] < start][-1:]
    near += [a.name for a in batched if order[a.node] > end][:1]
    target = str(leaves[0].target)
    paths = ", ".join(str(n.target) for n in leaves[:3]) + (" …" if len(leaves) > 3 else "")
    if target == query:
        what = f"{query!r} is a leaf module ({cls.__name__})"
    elif query.startswith(target + "."):
        what = f"{query!r} ({type(module).__name__}) runs inside {target!r}, a leaf module ({cls.__name__})"
    else:
        what = f"every activation in {query!r} ({type(module).__name__}) runs inside leaf modules ({paths}: "
        what += f"{cls.__name__})"
    suggest = f" The nearest graftable names, just before and after: {', '.join(near)}." if near else ""
    return (
        f"{where}: {what} in {model_name}. graftnet runs a leaf as one opaque call ({why_leaf(first)}), so no "
        f"activation inside it can be a site or a tap.{suggest}"
    )
