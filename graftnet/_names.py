"""Names of graftable activations (README "Names") and their resolution.

Every activation call in a traced model gets one public name:

* an activation module called once: its module path (``layer1.0.act2``);
* an activation module called several times: ``path@0``, ``path@1`` … in call order
  (torchvision's BasicBlock calls ``self.relu`` twice); the bare path is then ambiguous;
* the activation inside a fused norm+act module: ``path.act`` (``features.denseblock1.denselayer1.norm1.act``);
* a functional or method activation: its FX node name (``relu_3``).

A parent module path (``layer1.0``) resolves to the last activation that runs inside it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch.fx as fx
from torch import nn

from graftnet import activations
from graftnet._trace import Traced, follows_batch, shape_of
from graftnet.errors import NameResolutionError
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
            scope = base
        else:
            kind = _kind(node, root)
            inplace = activations.mutates_input(node, root)
            z = node.args[0] if node.args else None
            shape = shape_of(z) if isinstance(z, fx.Node) else None
            batched = follows_batch(z) if isinstance(z, fx.Node) else True
            scope = str(node.target) if node.op == "call_module" else _scope(node)
        result.append(Activation(name, node.name, scope, kind, attr, inplace, shape, batched))
    return result


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
        raise NameResolutionError(
            f"{where}: {query!r} in {model_name} is a {type(module).__name__} module with no activation that "
            f"runs inside it (is it a leaf FX does not trace into?). {hint}"
        )
    node = next((n for n in traced.eval_graph.nodes if n.name == query), None)
    if node is not None:
        raise NameResolutionError(
            f"{where}: {query!r} in {model_name} is a graph node ({node.op} {node.target}) but not an activation; "
            f"sites and taps are activations, named by their input. {hint}"
        )
    parents = {a.scope.rsplit(".", k)[0] for a in acts for k in range(1, a.scope.count(".") + 1)}
    near = closest(query, [a.name for a in acts if a.batched] + sorted(parents))
    near_text = f" Closest valid names: {', '.join(near)}." if near else ""
    raise NameResolutionError(f"{where}: {query!r} is not a graftable name in {model_name}.{near_text} {hint}")
