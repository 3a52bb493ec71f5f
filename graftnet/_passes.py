"""Graph passes: each takes an FX graph and returns a new, linted one (docs/architecture.md: spec → plan → passes).

* :func:`truncate_teacher` — a teacher cut after its deepest tap, returning the taps' pre-activations;
* :func:`splice_mixers` — the student with teacher calls and a mixer in front of every site.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence

import torch.fx as fx
from torch import nn

from graftnet import activations
from graftnet._names import Activation
from graftnet._plan import Plan
from graftnet.errors import TraceError

__all__ = ["fused_pre_activation", "splice_mixers", "truncate_teacher"]

_IDENTITY = nn.Identity()


def fused_pre_activation(module: nn.Module, act_attr: str, x: object) -> object:
    """Run a fused norm+act module without its activation.

    The module's own forward runs (so BatchNorm statistics and ``num_batches_tracked`` update exactly as
    they would), with the activation swapped for an identity for the duration of the call.
    """
    act = module._modules[act_attr]
    module._modules[act_attr] = _IDENTITY
    try:
        return module(x)
    finally:
        module._modules[act_attr] = act


def _copy(graph: fx.Graph) -> fx.Graph:
    new = fx.Graph()
    out = new.graph_copy(graph, {})
    new.output(out)
    return new


def _node(graph: fx.Graph, name: str) -> fx.Node:
    return next(n for n in graph.nodes if n.name == name)


def _split_fused(graph: fx.Graph, node: fx.Node, attr: str) -> fx.Node:
    """``y = fused(x)`` → ``z = fused_pre_activation(fused, attr, x); y = fused.<attr>(z)``; returns the act node."""
    with graph.inserting_before(node):
        module = graph.get_attr(str(node.target))
        z = graph.call_function(fused_pre_activation, (module, attr, *node.args), dict(node.kwargs))
        act = graph.call_module(f"{node.target}.{attr}", (z,))
    node.replace_all_uses_with(act)
    graph.erase_node(node)
    return act


def _activation_node(graph: fx.Graph, act: Activation) -> fx.Node:
    node = _node(graph, act.node)
    return _split_fused(graph, node, act.fused_attr) if act.fused_attr else node


def truncate_teacher(graph: fx.Graph, root: nn.Module, taps: Sequence[Activation]) -> fx.Graph:
    """A copy of ``graph`` that returns the pre-activations of ``taps`` (a tuple) and computes nothing else.

    Every node after the deepest tap is removed, then every node no tap depends on. A tap that a later
    in-place op would overwrite (``ReLU(inplace=True)`` right after it) is cloned first, so a tap never
    holds post-activation values.
    """
    g = _copy(graph)
    zs = [_activation_node(g, act).args[0] for act in taps]
    assert all(isinstance(z, fx.Node) for z in zs)
    order = {n: i for i, n in enumerate(g.nodes)}
    deepest = max(order[z] for z in zs)  # type: ignore[index]
    output = next(n for n in g.nodes if n.op == "output")
    output.args = (tuple(zs),)
    for n in reversed(list(g.nodes)):
        if n.op != "output" and order[n] > deepest:
            g.erase_node(n)
    # Dead-code elimination that keeps an in-place op only while something later reads what it writes.
    changed = True
    while changed:
        changed = False
        order = {n: i for i, n in enumerate(g.nodes)}
        for n in reversed(list(g.nodes)):
            if n.op not in ("placeholder", "output") and not n.users and not _writes_into_read_tensor(n, order, root):
                g.erase_node(n)
                changed = True
    out_args: list[fx.Node] = []
    for z in zs:
        assert isinstance(z, fx.Node)
        out_args.append(_clone_if_overwritten(g, z, root))
    output.args = (tuple(out_args),)
    # The teacher reads the student's own input tensor: if it writes into it, give it a copy instead.
    for placeholder in [n for n in g.nodes if n.op == "placeholder"]:
        copy = _clone_if_overwritten(g, placeholder, root)
        if copy is not placeholder:
            placeholder.replace_all_uses_with(copy, delete_user_cb=lambda user, c=copy: user is not c)  # type: ignore[misc]
    g.lint()
    return g


def _writes_into_read_tensor(n: fx.Node, order: dict[fx.Node, int], root: nn.Module) -> bool:
    if not activations.mutates_input(n, root) or not isinstance(n.args[0], fx.Node):
        return False
    written = _earlier_aliases(n.args[0], root)
    return any(user is not n and order[user] > order[n] for tensor in written for user in tensor.users)


def _overwritten_later(z: fx.Node, root: nn.Module) -> bool:
    """Whether a node after ``z`` writes in place into ``z`` or into a tensor sharing its memory — one that
    produced it in place (``z = relu_(a)`` shares ``a``) or one produced from it in place."""
    aliases = set(_earlier_aliases(z, root))
    node = z.next
    while node.op != "output":
        if node.args and node.args[0] in aliases and activations.mutates_input(node, root):
            return True
        node = node.next
    return False


def _clone_if_overwritten(g: fx.Graph, z: fx.Node, root: nn.Module) -> fx.Node:
    if not _overwritten_later(z, root):
        return z
    with g.inserting_after(z):
        return g.call_method("clone", (z,))


def _earlier_aliases(z: fx.Node, root: nn.Module) -> list[fx.Node]:
    """``z`` and the tensors it shares memory with because in-place ops produced it (``a += b`` …)."""
    chain = [z]
    while chain[-1].op != "placeholder" and activations.mutates_input(chain[-1], root):
        first = chain[-1].args[0]
        if not isinstance(first, fx.Node):
            break
        chain.append(first)
    return chain


def splice_mixers(
    graph: fx.Graph,
    root: nn.Module,
    plan: Plan,
    mixer_keys: Mapping[str, str],
    input_adapted: set[str],
    *,
    student_prefix: str = "student",
) -> fx.Graph:
    """The student graph with teacher calls up front and ``mixing.<key>(z, taps…)`` in front of each site.

    Module targets are prefixed with ``student_prefix`` so the graph runs on a module holding the
    student, ``teachers``, ``input_adapters`` and ``mixing``. An in-place site activation used to write
    into z itself; later readers of z are pointed at its output so they see the same values as before.
    """
    g = _copy(graph)
    site_nodes = {site.name: _activation_node(g, site.activation) for site in plan.sites}
    inplace = {site.name: activations.mutates_input(site_nodes[site.name], root) for site in plan.sites}
    aliases = {name: _earlier_aliases(node.args[0], root) for name, node in site_nodes.items()}  # type: ignore[arg-type]
    for n in g.nodes:
        if n.op in ("call_module", "get_attr"):
            n.target = f"{student_prefix}.{n.target}"
    placeholders = [n for n in g.nodes if n.op == "placeholder"]
    taps: dict[tuple[str, str], fx.Node] = {}
    running = [t for t in plan.teachers if t.runs]
    if running:
        if not placeholders:
            raise TraceError(
                "the student's traced forward takes no input, so its teachers have nothing to read (they see the "
                "student's first input); graft a student whose forward takes the input batch as an argument"
            )
        anchor = next(n for n in g.nodes if n.op != "placeholder")
        with g.inserting_before(anchor):
            for teacher in running:
                x: fx.Node = placeholders[0]
                if teacher.name in input_adapted:
                    x = g.call_module(f"input_adapters.{teacher.name}", (x,))
                out = g.call_module(f"teachers.{teacher.name}", (x,))
                for i, act in enumerate(teacher.taps):
                    taps[(teacher.name, act.node)] = g.call_function(operator.getitem, (out, i))
    for site in plan.sites:
        site_node = site_nodes[site.name]
        z = site_node.args[0]
        assert isinstance(z, fx.Node)
        inputs = (z, *(taps[(t.teacher, t.activation.node)] for t in site.taps))
        with g.inserting_before(site_node):
            mixed = g.call_module(f"mixing.{mixer_keys[site.name]}", inputs)
        site_node.update_arg(0, mixed)
        if inplace[site.name]:
            node = site_node
            while node.op != "output":
                node = node.next
                for alias in aliases[site.name]:
                    if alias in node.all_input_nodes:
                        node.replace_input_with(alias, site_node)
    g.lint()
    return g
